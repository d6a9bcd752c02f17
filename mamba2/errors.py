"""Errors meant for the person running mamba2, not for a traceback."""


class UserError(ValueError):
    """A mistake in what the user asked for (bad path, empty corpus, bad checkpoint, ...).

    A ``ValueError``, like the errors of the config and the SSD checks: ``except ValueError`` catches every
    refusal of bad input. The message is one line, user-facing; the CLI prints ``error: <message>`` and exits
    with status 2.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers and ``kill`` send): handled as Ctrl-C is (the work kept, then a stop), but the
    command exits with 143 (128 + 15), the status a process ended by SIGTERM reports, instead of Ctrl-C's 130."""


def interrupt_for(signum: int) -> KeyboardInterrupt:
    """The exception a stop by signal ``signum`` raises: :class:`Terminated` for SIGTERM, else KeyboardInterrupt."""
    import signal

    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def interrupted_status(e: KeyboardInterrupt) -> int:
    """The exit status of a command stopped by ``e``: 143 after SIGTERM, 130 after Ctrl-C."""
    return 143 if isinstance(e, Terminated) else 130


_sigints: list[int] = []


def recording_sigint(signum, frame) -> None:
    """Python's default SIGINT handler (raise KeyboardInterrupt) that also records the signal, so that the command
    can tell a Ctrl-C from the other error a module left half-imported by it raises later (:func:`sigints_seen`).
    Code that defers Ctrl-C (the trainer) takes it over as it would the default."""
    _sigints.append(signum)
    raise KeyboardInterrupt


def sigints_seen() -> int:
    """How many times :func:`recording_sigint` has run in this process."""
    return len(_sigints)
