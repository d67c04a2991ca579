"""The one exception type the CLI turns into a one-line message (no traceback)."""


class DfkdError(Exception):
    """A problem with the user's input that names what is wrong and how to fix it."""
