"""The one exception type for errors a user can cause."""


class Fl2tError(Exception):
    """A user error: the message says what was wrong and what to do. The CLI prints it on one line, exit 2."""


class Cancelled(Fl2tError):
    """The caller's cancel signal stopped a long operation; nothing was written (the library is as it was)."""
