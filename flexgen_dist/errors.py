"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class UserError(ValueError):
    """Bad input: the message says what is wrong, where, and how to fix it (one line)."""


class NotSupportedYet(UserError):
    """A documented option whose implementation has not landed yet."""
