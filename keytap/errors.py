"""The one error type the CLI turns into a one-line message and a non-zero exit code."""


class KeytapError(Exception):
    """A problem the user can fix; the message says how."""
