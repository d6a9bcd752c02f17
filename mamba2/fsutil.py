"""Atomic writes: a directory or a file appears whole, or the previous one stays; never half of one.

Both writers build the new version in a hidden temporary sibling of the target (same file system, so the final
rename is atomic) and give it the permissions a plain ``mkdir``/``open`` would have under the current umask:
``tempfile`` creates private 0700 directories and 0600 files, which must not leak into what is kept.

:func:`locked` keeps a second process from writing the same target at the same time (each write is whole, but two
writers interleave their saves and delete each other's temporary directories).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from mamba2.errors import UserError


class Busy(UserError):
    """Another process holds the lock of :func:`locked` on the same target."""


def atomic_dir(target: str | Path, fill: Callable[[Path], None], *, is_valid: Callable[[Path], bool],
               overwrite: bool = False, what: str = "directory") -> Path:
    """Write the directory ``target`` with ``fill`` so that it is replaced whole or not at all.

    Steps: finish a swap that a killed earlier write left half done (:func:`recover`); delete the hidden
    ``.<name>.tmp-*`` siblings such writes leave behind; check that ``target`` may be replaced; call
    ``fill(tmp)`` on a new empty directory ``.<name>.tmp-*`` next to ``target``; set every entry in it to the
    permissions the umask gives a new directory (0777 & ~umask) or file (0666 & ~umask, 0777 & ~umask for an
    executable one); then swap it in: the old ``target`` is renamed to ``.<name>.old-*``, the new one to
    ``target``, and every ``.<name>.old-*`` deleted.

    Guarantees: at every moment ``target`` is the old directory, the new one, or (only between the two renames
    of the swap) missing with the old one kept as ``.<name>.old-*``, which the next :func:`atomic_dir` or
    :func:`recover` call puts back. If ``fill`` raises, ``target`` is untouched and the temporary directory
    is deleted.

    Args:
        target: the directory to write (a symbolic link: the directory it leads to, the link kept); its parent
            is created if missing.
        fill: writes the content into the directory it is given (plain writes: it is not visible yet).
        is_valid: whether a directory is one this writer may replace (with ``overwrite``) or put back after
            an interrupted swap, e.g. "is a checkpoint".
        overwrite: replace a non-empty ``target`` (one for which ``is_valid`` holds). A missing target or an
            empty directory is always written.
        what: the kind of directory, for error messages ("checkpoint", "model directory").
    Returns:
        ``target`` as a :class:`Path`.
    Raises:
        UserError: ``target`` is a file; it is a non-empty directory and ``overwrite`` is false or
            ``is_valid`` rejects it; or a file-system operation failed (naming ``target`` and the reason).
            Whatever else ``fill`` raises propagates unchanged.
    """
    given, target = Path(target), _followed(target)
    recover(target, is_valid)
    for stale in _siblings(target, "tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    _check_replaceable(target, is_valid, overwrite, what)
    tmp = _temp_dir(target, "tmp", what)
    try:
        fill(tmp)
        _apply_umask(tmp)
        _swap(tmp, target)
    except OSError as e:
        raise UserError(f"cannot write {what} {target}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # gone already after a successful swap
    return given


def recover(target: str | Path, is_valid: Callable[[Path], bool]) -> None:
    """Finish a swap of :func:`atomic_dir` interrupted between its two renames.

    If ``target`` is missing and a ``.<name>.old-*`` sibling for which ``is_valid`` holds exists, the newest such
    backup is renamed back to ``target``; otherwise nothing changes. Loaders call this before reading.

    Raises:
        UserError: the rename failed (naming the backup and the reason).
    """
    target = _followed(target)
    if target.exists():
        return
    backups = [b for b in _siblings(target, "old") if is_valid(b)]
    if backups:
        newest = max(backups, key=lambda b: b.stat().st_mtime_ns)
        try:
            os.replace(newest, target)
        except OSError as e:
            raise UserError(f"cannot restore {target} from {newest}: {e.strerror or e}") from None


def check_writable(target: str | Path, *, is_valid: Callable[[Path], bool], overwrite: bool = False,
                   what: str = "directory") -> None:
    """Fail now rather than after long work if :func:`atomic_dir` with the same arguments would refuse or fail
    before calling ``fill``.

    Runs its checks: :func:`recover`, whether ``target`` may be replaced, and whether a temporary sibling can
    be created (the parent is created if missing; the sibling is deleted again).

    Raises:
        UserError: as :func:`atomic_dir` (a file, a non-empty directory it may not replace, a parent or sibling
            that cannot be created), naming ``target``.
    """
    target = _followed(target)
    recover(target, is_valid)
    _check_replaceable(target, is_valid, overwrite, what)
    os.rmdir(_temp_dir(target, "tmp", what))


def atomic_file(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write the file ``path`` with ``write`` so that it is replaced whole or not at all.

    ``write(tmp)`` writes a temporary file ``.<name>.tmp-*`` in the same directory (it exists, empty); the file
    then gets the permissions of a plain ``open`` under the umask (0666 & ~umask) and is renamed over ``path``
    with :func:`os.replace` (a symbolic link ``path``: the file it leads to, the link kept). If ``write`` raises,
    ``path`` is untouched and the temporary file deleted.

    Returns:
        ``path`` as a :class:`Path`.
    Raises:
        UserError: the parent directory is missing or a file-system operation failed (naming ``path`` and the
            reason). Whatever else ``write`` raises propagates unchanged.
    """
    given, path = Path(path), _followed(path)      # a link stays a link to the new file
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return given


def lock_path(target: str | Path) -> Path:
    """The lock file of ``target`` for :func:`locked`: ``.<name>.lock`` beside it (beside the directory a
    symbolic link ``target`` leads to: one lock however the directory is named)."""
    target = _followed(target)
    if target.name in ("", ".."):           # "." or "..": name the folder itself
        target = Path(os.path.abspath(target))
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def locked(target: str | Path, *, busy: Callable[[Path], str], what: str = "directory",
           create_parent: bool = True) -> Iterator[Path | None]:
    """Hold, until the block ends, an exclusive lock for this process on writing ``target``, or refuse at once.

    The lock is ``fcntl.flock`` on the file :func:`lock_path` (``.<name>.lock`` beside ``target``; not inside it,
    as :func:`atomic_dir` replaces the whole directory, which would give a later process another file to lock).
    The operating system drops it when the process ends, however it ends (a kill included), so a lock file left
    behind by a killed process blocks nothing: the next process locks it again. The file is deleted when the block
    ends. Where the OS has no ``fcntl`` (Windows), or the file system cannot lock (some network ones), there is no
    lock. Two blocks of the same process on one target exclude each other too.

    Args:
        busy: the error message when another process holds the lock, given the lock file's path.
        what: the kind of ``target`` for error messages, as in :func:`atomic_dir`.
        create_parent: create a missing parent of ``target`` (as :func:`atomic_dir` does); if false and the parent
            is missing, there is nothing to write into and no lock is taken.
    Yields:
        the lock file, or None where no lock was taken.
    Raises:
        Busy: another process holds the lock (``busy``'s message).
        UserError: the lock file cannot be created (naming ``target`` and the reason).
    """
    path = lock_path(target)
    fd = None if not create_parent and not path.parent.is_dir() else _lock(path, target, busy, what)
    if fd is None:
        yield None
        return
    try:
        yield path
    finally:
        if _same_file(fd, path):        # deleted while still locked, so that no one locks the deleted file
            with contextlib.suppress(OSError):
                path.unlink()
        os.close(fd)


def _lock(path: Path, target: str | Path, busy: Callable[[Path], str], what: str) -> int | None:
    """A descriptor of the lock file ``path``, locked (see :func:`locked`); None where no lock can be taken."""
    try:
        import fcntl
    except ImportError:                     # Windows: no lock
        return None
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)   # reading is enough to lock (and another
            # user's file left by a killed run can be read)
        except OSError as e:
            raise UserError(f"cannot write {what} {target}: {reason(path, e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(busy(path)) from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return None                 # a file system without locks: go on as on Windows
            raise UserError(f"cannot write {what} {target}: {e.strerror or e} ({path})") from None
        if _same_file(fd, path):
            return fd
        os.close(fd)         # the holder before deleted the file after it was opened here: lock the one there now


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _siblings(target: Path, kind: str) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.{kind}-*"))


def reason(path: str | Path, e: OSError) -> str:
    """Why ``path`` (or a folder under it) could not be made: ``e``'s reason, or, where one of its parents is a
    file ("File exists" / "Not a directory" say nothing useful then), which one."""
    for parent in Path(path).parents:
        if parent.exists():
            return f"{parent} is a file, not a folder" if not parent.is_dir() else str(e.strerror or e)
    return str(e.strerror or e)


def _temp_dir(target: Path, kind: str, what: str) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-", dir=target.parent))
    except OSError as e:
        raise UserError(f"cannot write {what} {target}: {reason(target, e)}") from None


def _check_replaceable(target: Path, is_valid: Callable[[Path], bool], overwrite: bool, what: str) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise UserError(f"refusing to overwrite {target}: it is a file, not a {what}")
    if not any(target.iterdir()):
        return
    if not is_valid(target):     # overwriting replaces only what this package wrote
        raise UserError(f"refusing to overwrite {target}: it is not empty and is not a {what} "
                        f"(give a new or empty folder)")
    if not overwrite:
        raise UserError(f"refusing to overwrite {target}: it holds a {what} already (--overwrite on the command "
                        f"line, overwrite=True in Python, replaces it)")


def _umask() -> int:
    umask = os.umask(0)   # the only way to read it is to set it
    os.umask(umask)
    return umask


def _apply_umask(root: Path) -> None:
    umask = _umask()
    root.chmod(0o777 & ~umask)
    for base, dirs, files in os.walk(root):
        for d in dirs:
            p = Path(base, d)
            if not p.is_symlink():
                p.chmod(0o777 & ~umask)
        for f in files:
            p = Path(base, f)
            if not p.is_symlink():
                p.chmod((0o777 if p.stat().st_mode & 0o100 else 0o666) & ~umask)


def _followed(target: str | Path) -> Path:
    """``target``, or where it leads if it is a symbolic link (a dangling one too): the writers of this module
    replace that directory, leaving the link in place, rather than the link itself."""
    target = Path(target)
    return Path(os.path.realpath(target)) if target.is_symlink() else target


def _swap(tmp: Path, target: Path) -> None:
    if target.exists():
        old = tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent)
        os.replace(target, old)   # a directory may be renamed over an empty one
    os.replace(tmp, target)
    for backup in _siblings(target, "old"):   # this one, and any an earlier interrupted write could not restore
        shutil.rmtree(backup, ignore_errors=True)
