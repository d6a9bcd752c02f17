"""Output paths that the scripts in benchmarks/ share: a file or folder that cannot be written is refused with
argparse's one-line error before any long work starts, instead of a traceback after it; a JSON report is written
whole or not at all."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path


def unwritable(folder: Path) -> str | None:
    """Why a file cannot be made in ``folder`` (tried, as permissions do not tell for root or /proc), or None."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as e:
        return e.strerror or str(e)


def check_output_file(ap: argparse.ArgumentParser, flag: str, path: Path) -> None:
    """``ap.error`` (exit status 2) unless ``path`` (given as ``flag``) can be written: not a folder, its folder
    exists and takes a new file, and an existing file is writable."""
    if path.is_dir():
        ap.error(f"{flag} {path} is a folder, not a file")
    if not path.parent.is_dir():
        ap.error(f"{flag} {path}: no folder {path.parent}")
    why = unwritable(path.parent) or (None if os.access(path, os.W_OK) or not path.exists() else "a read-only file")
    if why:
        ap.error(f"{flag} {path}: cannot be written ({why})")


def write_json(path: Path, report: dict) -> str | None:
    """Write ``report`` to ``path`` whole: into a temporary file beside it, then renamed over it (values JSON cannot
    hold as their ``repr``). The reason it could not be written, or None."""
    temp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        temp.write_text(json.dumps(report, indent=1, default=repr))
        os.replace(temp, path)
        return None
    except OSError as e:
        return e.strerror or str(e)
    finally:
        temp.unlink(missing_ok=True)
