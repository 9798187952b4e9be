"""The one error type for bad input data: its message names the file and what is wrong."""


class DataError(ValueError):
    pass
