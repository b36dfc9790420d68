"""The one error type users see: the CLI prints it as a single line, without a traceback."""


class MedkdError(Exception):
    """A user error (bad flag, missing file, mismatched cache): its message says what and how to fix."""
