"""The one exception type that means "the user asked for something we cannot do".

The CLI prints its message as a single line and exits 2; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input (file, flag, shape); the message says what and how to fix it."""


class NonFiniteError(UserError):
    """NaN or inf appeared while sampling (damaged weights, absurd noise); says where first."""
