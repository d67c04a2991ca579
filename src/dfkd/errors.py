"""The one exception type the CLI turns into a one-line message (no traceback)."""


class DfkdError(Exception):
    """A problem with the user's input that names what is wrong and how to fix it."""


def require_one_of(name: str, value, choices) -> None:
    """The one-line error, in one wording everywhere, where `value` is none of `choices` (a
    registry name, or an option set in Python or a config file that the CLI never checks)."""
    if value not in choices:
        raise DfkdError(f"unknown {name} '{value}'; choose one of: {', '.join(choices)}")
