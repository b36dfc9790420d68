"""The one error type users see: the CLI prints it as a single line, without a traceback."""


class MedkdError(Exception):
    """A user error (bad flag, missing file, mismatched cache): its message says what and how to fix."""


def first_line(err: BaseException) -> str:
    """The first line of a library's error text (its type name if it has none): what a one-line
    MedkdError quotes of the error beneath it."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
