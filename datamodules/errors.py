"""The one exception type for bad input data: its message is the one line users see."""


class DataError(ValueError):
    """Bad or missing input data; the message names the file, key or shape at fault."""
