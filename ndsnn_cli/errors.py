"""The one exception type for bad user input: the CLI prints it on one line and exits with code 2."""


class UserError(Exception):
    """Bad input (recipe, file, path): message says what is wrong and where."""
