"""User-facing errors.

Anything a user can cause (bad path, unknown repo, wrong tensors, unsafe pickle...)
is raised as :class:`StatecastError` with a one-line message that names the
problem. The CLI prints it as ``error: <message>`` and exits with status 2; the
Python API lets it propagate.
"""


class StatecastError(Exception):
    """A problem with the user's input, reported in one line (CLI exit status 2)."""

    exit_code = 2


class ParityFailed(StatecastError):
    """``verify`` ran, but the converted model is outside the tolerances (exit 1)."""

    exit_code = 1

