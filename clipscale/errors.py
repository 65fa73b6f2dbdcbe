"""The base class of clipscale's errors about its inputs (recipes, shards, data sets, results tables,
sweeps): the command line prints their message, which names the input and the fix, without a traceback."""


class InputError(ValueError):
    """Bad input; the message names the key, file or value and what to change."""


class DataError(InputError):
    """Shards cannot be used as configured; the message names the spec or file."""
