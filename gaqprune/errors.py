"""The one exception type for user mistakes: the CLI prints it as a one-line error and exits 2."""


class GaqpruneError(ValueError):
    """A problem with the user's input (flag, path, file, cache), explained in one line."""
