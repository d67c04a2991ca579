"""The one exception type the CLI turns into a one-line message (no traceback)."""


class DfkdError(Exception):
    """A problem with the user's input that names what is wrong and how to fix it."""


def require_one_of(name: str, value, choices) -> None:
    """The one-line error where a setting's `value` is none of `choices` (an option set in
    Python or a config file, which the CLI's own check never sees)."""
    if value not in choices:
        raise DfkdError(f"{name} must be one of {', '.join(choices)}, got '{value}'")
