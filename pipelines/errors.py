"""Errors that mean "the user must fix something": the CLI prints them without a traceback."""


class UserError(Exception):
    """Bad input or configuration; the message says what to fix."""
