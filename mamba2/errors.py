"""Errors meant for the person running mamba2, not for a traceback."""


class UserError(ValueError):
    """A mistake in what the user asked for (bad path, empty corpus, bad checkpoint, ...).

    A ``ValueError``, like the errors of the config and the SSD checks: ``except ValueError`` catches every
    refusal of bad input. The message is one line, user-facing; the CLI prints ``error: <message>`` and exits
    with status 2.
    """


def type_name(value) -> str:
    """``list``, ``numpy.ndarray``, …: the type of ``value`` as an error message names it."""
    t = type(value)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


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


_interrupts: list[int] = []


def recording_interrupt(signum, frame) -> None:
    """The handler of SIGINT and SIGTERM for a whole command: raise :func:`interrupt_for` the signal (as Python's
    default SIGINT handler does; SIGTERM's default would kill the process with no message) and record it, so that
    the command can tell a stop from the other error a module left half-imported by it raises later
    (:func:`interrupts_seen`). Code that defers a stop (the trainer) takes it over as it would the default."""
    _interrupts.append(signum)
    raise interrupt_for(signum)


def interrupts_seen() -> int:
    """How many times :func:`recording_interrupt` has run in this process."""
    return len(_interrupts)


def last_interrupt() -> int | None:
    """The signal :func:`recording_interrupt` handled last (None: none yet)."""
    return _interrupts[-1] if _interrupts else None
