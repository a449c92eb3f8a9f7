"""The one exception type for failures a user can fix: the CLI prints its message (what was wrong, what to do)."""


class CamidError(Exception):
    """A user-facing failure. The message says what was wrong and what to do about it."""
