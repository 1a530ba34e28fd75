"""The one exception type for mistakes a user can make (paths, values, mismatched files).

Entry scripts catch ``UserError``, print its message as one line and exit with code 2.
"""


class UserError(Exception):
    """A problem caused by the user's input; the message names the problem and the fix."""

    exit_code = 2
