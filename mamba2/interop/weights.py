"""Reading and writing weight files safely: safetensors (preferred) or ``.bin`` through ``torch.load(weights_only=True)``.

Accepted in a model directory, first match wins: ``model.safetensors``, ``model.safetensors.index.json`` (shards),
``pytorch_model.bin``, ``pytorch_model.bin.index.json``. Anything else (``.pt``/``.ckpt`` pickles, GGUF, Flax, …)
is refused with a message naming what was found. A safetensors header is parsed before any data is read, so a
truncated file is reported with the first tensor that lies past the end of the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch

from mamba2.errors import UserError
from mamba2.interop.formats import BIN, BIN_INDEX, SAFETENSORS, SAFETENSORS_INDEX

_REFUSED_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin", ".gguf", ".msgpack", ".h5", ".npz",
                     ".safetensors", ".index.json")
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives: name as stored, shape, torch dtype, and its file."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path


class WeightFiles:
    """The tensors of a model directory, indexed without reading their data.

    Attributes:
        files: the weight files (one, or the shards of an index).
        infos: stored name -> :class:`TensorInfo`.
    Raises (from :meth:`open`):
        UserError: no supported weight file, a truncated/corrupt file, a pickle holding more than tensors, a
            tensor stored twice in shards; each message names the file (and the tensor where one is known).
    """

    def __init__(self, files: list[Path], infos: dict[str, TensorInfo], bin_cache: dict[Path, dict]):
        self.files, self.infos, self._bin = files, infos, bin_cache

    @classmethod
    def open(cls, directory: str | Path) -> "WeightFiles":
        directory = Path(directory)
        files = find_weight_files(directory)
        infos: dict[str, TensorInfo] = {}
        bins: dict[Path, dict] = {}
        for f in files:
            if f.suffix == ".safetensors":
                found = _safetensors_infos(f)
            else:
                bins[f] = _load_bin(f)
                found = {k: TensorInfo(k, tuple(v.shape), v.dtype, f) for k, v in bins[f].items()}
            for name, info in found.items():
                if name in infos:
                    raise UserError(f"{f}: tensor {name!r} is also stored in {infos[name].file}")
                infos[name] = info
        return cls(files, infos, bins)

    def read(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, data)`` for the given stored tensors (CPU, stored dtype), opening each file once."""
        from safetensors import SafetensorError, safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.infos[name].file, []).append(name)
        for file, group in by_file.items():
            if file in self._bin:
                yield from ((n, self._bin[file][n]) for n in group)
                continue
            name = group[0]
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in group:
                        yield name, f.get_tensor(name)
            except (SafetensorError, OSError) as e:
                raise UserError(f"{file}: cannot read tensor {name!r}: {_one_line(e)}") from None

    def describe(self) -> str:
        return ", ".join(str(f) for f in self.files)


def find_weight_files(directory: Path) -> list[Path]:
    """The weight files of ``directory`` in order of preference (see module docstring).

    Raises:
        UserError: the directory is missing or holds no supported weight file.
    """
    if not directory.is_dir():
        raise UserError(f"model directory not found: {directory}")
    if (directory / SAFETENSORS).is_file():
        return [directory / SAFETENSORS]
    if (directory / SAFETENSORS_INDEX).is_file():
        return _shards(directory / SAFETENSORS_INDEX)
    if (directory / BIN).is_file():
        return [directory / BIN]
    if (directory / BIN_INDEX).is_file():
        return _shards(directory / BIN_INDEX)
    others = sorted(p.name for p in directory.iterdir() if p.name.endswith(_REFUSED_SUFFIXES))
    found = f"found {', '.join(others)}" if others else "found no weight file"
    raise UserError(f"{directory}: no supported weights ({found}); expected {SAFETENSORS} (preferred) or {BIN}, "
                    f"or their .index.json shards; other pickles are never loaded")


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({str(v) for v in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{index}: not a valid shard index ({_one_line(e)})") from None
    paths = []
    for name in files:
        p = index.parent / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not p.is_file():
            raise UserError(f"{index}: shard {name!r} is missing or outside the model directory")
        if p.suffix not in (".safetensors", ".bin"):
            raise UserError(f"{index}: shard {name!r} is neither .safetensors nor .bin")
        paths.append(p)
    return paths


def _safetensors_infos(file: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header; check every tensor's byte range lies inside the file."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise UserError(f"{file}: truncated ({size} bytes): not even a safetensors header")
        n = struct.unpack("<Q", raw)[0]
        if n > _MAX_HEADER or n > size - 8:
            raise UserError(f"{file}: truncated or not a safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(fh.read(n))
        except ValueError as e:
            raise UserError(f"{file}: corrupt safetensors header ({_one_line(e)})") from None
    data_len = size - 8 - n
    infos = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[meta["dtype"]]
            shape = tuple(int(s) for s in meta["shape"])
            start, end = (int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{file}: tensor {name!r} has an unreadable or unsupported header entry {meta}") from None
        if end > data_len:
            raise UserError(f"{file}: truncated: tensor {name!r} needs bytes {start}..{end} of the data section, "
                            f"the file holds {data_len}")
        if end - start != math.prod(shape) * torch.empty((), dtype=dtype).element_size():
            raise UserError(f"{file}: corrupt: tensor {name!r} of shape {list(shape)} spans {end - start} bytes")
        infos[name] = TensorInfo(name, shape, dtype, file)
    return infos


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` (memory-mapped when possible): a flat dict of tensors, nothing else."""
    obj = None
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise UserError(f"{file}: cannot read: {_one_line(e)} (truncated or corrupt?)") from None
    except Exception as e:  # UnpicklingError, OSError, zip errors: all mean "not a weights-only file"
        raise UserError(_bin_error(file, e)) from None
    if obj is None:  # legacy (non-zip) torch.save format cannot be memory-mapped
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(_bin_error(file, e)) from None
    if not isinstance(obj, Mapping):
        raise UserError(f"{file}: expected a dict of tensors (a state_dict), got {type(obj).__name__}")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise UserError(f"{file}: entry {k!r} is a {type(v).__name__}, not a tensor: expected a flat state_dict")
    return dict(obj)


def _bin_error(file: Path, e: Exception) -> str:
    if not _looks_like_torch_save(file):
        return f"{file}: cannot read: it is not a PyTorch weights file (neither torch.save's zip nor its legacy pickle)"
    if "Weights only load failed" in str(e) or type(e).__name__ == "UnpicklingError":
        return (f"{file}: refused: it holds pickled objects other than tensors; only weights-only files are "
                f"loaded (torch.load(weights_only=True)); convert it to safetensors from a trusted environment")
    return f"{file}: cannot read: {_one_line(e)} (truncated or not a PyTorch weights file)"


def _looks_like_torch_save(file: Path) -> bool:
    """Whether ``file`` starts as torch.save writes: a zip archive, or (legacy format) a pickle's protocol opcode."""
    try:
        with open(file, "rb") as f:
            head = f.read(4)
    except OSError:
        return True                # let the loader's own error speak
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _one_line(e: BaseException) -> str:
    s = " ".join(str(e).split())
    return s[:300] if s else type(e).__name__


@contextlib.contextmanager
def _write_errors_as_oserror():
    """The writers' failures to write (a full disk, an I/O error) as OSError, which the callers' file-system
    handling turns into one line: safetensors raises its own error type, torch.save a RuntimeError."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        raise OSError(_one_line(e)) from None
    except RuntimeError as e:
        text = str(e)
        if "inline_container" in text:    # torch's zip writer: a short write, its message names no cause
            raise OSError(f"the file was not written whole (is the disk full?): {_one_line(e)}") from None
        if "write" not in text.lower():
            raise
        raise OSError(_one_line(e)) from None


def save_safetensors(tensors: Mapping[str, torch.Tensor], file: Path, metadata: dict[str, str] | None = None) -> None:
    """Write contiguous CPU copies of ``tensors`` (no two may share memory). Raises OSError when the file cannot
    be written (e.g. the disk is full), with the writer's reason."""
    from safetensors.torch import save_file

    with _write_errors_as_oserror():
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(file),
                  metadata=metadata or {"format": "pt"})


def save_module(model: torch.nn.Module, file: Path) -> None:
    """safetensors' ``save_model`` (tied weights stored once); OSError when the file cannot be written."""
    from safetensors.torch import save_model

    with _write_errors_as_oserror():
        save_model(model, str(file))


def torch_save(obj: Any, file: Path) -> None:
    """``torch.save``; OSError when the file cannot be written."""
    with _write_errors_as_oserror():
        torch.save(obj, file)


def save_bin(tensors: Mapping[str, torch.Tensor], file: Path) -> None:
    """``torch.save`` a flat state_dict (tensors that share memory stay shared), loadable with weights_only."""
    torch_save({k: v.detach().cpu() for k, v in tensors.items()}, file)


def names_preview(names: Iterable[str], n: int = 4) -> str:
    names = sorted(names)
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(repr(x) for x in names[:n]) + more
