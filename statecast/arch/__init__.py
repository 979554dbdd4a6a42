"""Model definitions, pure PyTorch, no I/O and no export concerns.

One file per architecture (config -> blocks -> model); shared pieces in ``layers.py``;
optional compiled kernels as real source files in ``kernels/``. Which module and classes
make a family's model is recorded in its family record (``statecast.families``), and
imported only when that family is used.
"""
