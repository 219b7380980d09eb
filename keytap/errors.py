"""The error types the CLI turns into a one-line message and a non-zero exit code."""


class KeytapError(Exception):
    """A problem the user can fix; the message says how."""


class BadInput(KeytapError):
    """A value on the command line that cannot work (exit 2, found before anything is
    attached or created)."""
