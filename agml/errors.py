"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class AgmlError(Exception):
    """A problem the user can fix (bad input, missing file, unknown model)."""


class InputError(AgmlError, ValueError):
    """Invalid user input: a file, a field, an option value."""
