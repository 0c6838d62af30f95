"""Errors the command line reports as one line with exit code 2: bad input, found before any work starts."""


class JobInputError(ValueError):
    """Bad input to a job, found before any work starts: the CLI prints it and exits with code 2."""
