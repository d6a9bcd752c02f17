"""Errors meant for the person running mamba2, not for a traceback."""


class UserError(Exception):
    """A mistake in what the user asked for (bad path, empty corpus, bad checkpoint, ...).

    The message is one line, user-facing; the CLI prints ``error: <message>`` and exits with status 2.
    """
