"""The one exception type for problems a user can fix (bad file, bad flag, bad bundle).

The CLI prints its message on one line and exits with status 2; nothing else is
caught there, so real bugs still show a traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as a one-line message."""
