"""The one exception type that reaches the user as a single line."""


class UserError(Exception):
    """Bad input, or a missing privilege or kernel feature.  The CLI prints
    str(error) on one line and exits 1; no traceback."""
