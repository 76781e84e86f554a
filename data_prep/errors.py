"""Errors a user can act on (bad paths, malformed annotation files, conflicting outputs)."""


class DataPrepError(Exception):
    """A problem with the inputs or the output directory, reported as one line, no traceback.

    Raised instead of letting a traceback escape, because the person running the command
    needs to know which file is wrong and what was expected, not where in our code it was
    noticed. ``exit_code``: 2 for bad inputs or options, 1 for work left undone.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
