"""The one exception type that means "the user gave us something wrong", and its one-line text.

The CLI turns a `UserError` into a single line on stderr and exit status 2, never a traceback.
Everything that can be checked before expensive work starts raises it with a message naming
the file / field / path and what would be valid.
"""


class UserError(Exception):
    """Bad input: a spec, a path, a dataset. `str(err)` is what the user sees."""


class Interrupted(UserError):
    """Ctrl-C (or a stop) before the work ended: what is finished is kept, and `--resume` goes on."""


class SearchInterrupted(Interrupted):
    """Ctrl-C (or a stop) before every trial ended: finished trials are kept, the search can resume."""


def one_line(error, limit: int = 200, last: bool = False) -> str:
    """Another library's error (or text) as one line of at most `limit` characters.

    Whitespace runs, newlines included, become one space; with `last`, only the last non-empty
    line is kept (a traceback's last line names the exception). Empty text gives the type's name.
    """
    text = str(error)
    if last:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        text = lines[-1] if lines else ""
    flat = " ".join(text.split())[:limit]
    return flat or (type(error).__name__ if isinstance(error, BaseException) else "")
