"""Errors meant for the person running mamba2, not for a traceback."""


class UserError(ValueError):
    """A mistake in what the user asked for (bad path, empty corpus, bad checkpoint, ...).

    A ``ValueError``, like the errors of the config and the SSD checks: ``except ValueError`` catches every
    refusal of bad input. The message is one line, user-facing; the CLI prints ``error: <message>`` and exits
    with status 2.
    """
