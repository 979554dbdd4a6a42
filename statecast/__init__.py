"""statecast: unified checkpoints, parity reports and recurrent-mode export for sequence models."""

__version__ = "0.1.0"
