"""The one exception type that means "the user gave us something wrong".

The CLI turns a `UserError` into a single line on stderr and exit status 2, never a traceback.
Everything that can be checked before expensive work starts raises it with a message naming
the file / field / path and what would be valid.
"""


class UserError(Exception):
    """Bad input: a spec, a path, a dataset. `str(err)` is what the user sees."""


class SearchInterrupted(UserError):
    """Ctrl-C (or a stop) before every trial ended: finished trials are kept, the search can resume."""
