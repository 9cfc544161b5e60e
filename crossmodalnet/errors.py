"""The one exception type users see: a one-line message that names the file and the problem.

The CLI catches it, prints `error: <message>` and exits with status 2, with no traceback.
"""

__all__ = ["CrossModalNetError"]


class CrossModalNetError(Exception):
    """A problem with the user's input (file, config, arguments) that they can act on."""
