"""The one exception type that the command line turns into a one-line error, and the line for an interrupt."""

INTERRUPTED = "interrupted: nothing was written"


class TransMLAError(Exception):
    """A problem with the user's input or environment, with a message that names the fix."""
