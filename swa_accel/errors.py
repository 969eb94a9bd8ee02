"""The one kind of error a user sees as a single line before training starts."""


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line before training starts."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type name when the message is empty)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
