"""Layer layouts: which mixer each layer runs and whether it adds a SwiGLU MLP (hybrids and the paper's baselines).

A layout is one entry per layer: a mixer kind (``mamba2``, ``mamba1`` or ``attention``), optionally followed by
``+mlp``. It is written as a list (``["mamba2", "attention+mlp"]``) or as one string with ``*k`` repeats
(``"mamba2*3,attention,mamba2*3"``). Dao & Gu 2024, §9.2.3 (hybrid models) and the Transformer++ / Mamba-1
baselines of §9.2.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

MIXER_KINDS = ("mamba2", "mamba1", "attention")
MLP_SUFFIX = "+mlp"


class LayerSpec(NamedTuple):
    """What one layer holds: its mixer kind and whether a SwiGLU MLP follows it."""

    mixer: str
    mlp: bool


def parse_layout(value: str | Sequence[str], n_layer: int | None) -> tuple[str, ...]:
    """Normalise a layout to a tuple of ``n_layer`` canonical entries (``"mamba2"``, ``"attention+mlp"``, …).

    Args:
        value: a sequence of entries, or a comma-separated string whose entries may end in ``*k`` (k repeats).
        n_layer: the number of layers the layout must describe (None: any number).
    Raises:
        ValueError: naming the bad entry and its position (unknown mixer, bad repeat count) or the length
            mismatch with ``n_layer``.
    """
    if isinstance(value, str):
        entries: list[str] = []
        for part in (p.strip() for p in value.split(",")):
            name, _, count = part.partition("*")
            if count and not (count.strip().isdigit() and int(count) > 0):
                raise ValueError(f"layout entry {part!r}: the repeat count after '*' must be a positive integer")
            entries += [name.strip()] * (int(count) if count else 1)
    else:
        entries = list(value)
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, str):
            raise ValueError(f"layout[{i}] must be a string, got {entry!r}")
        mixer, mlp = split_entry(entry.strip().lower())
        if mixer not in MIXER_KINDS:
            raise ValueError(f"layout[{i}] = {entry!r}: unknown mixer {mixer!r}; known mixers: "
                             f"{', '.join(MIXER_KINDS)} (each optionally followed by '{MLP_SUFFIX}')")
        out.append(mixer + (MLP_SUFFIX if mlp else ""))
    if n_layer is not None and len(out) != n_layer:
        raise ValueError(f"layout has {len(out)} entries but n_layer={n_layer}: give exactly one entry per layer")
    return tuple(out)


def split_entry(entry: str) -> tuple[str, bool]:
    """``"attention+mlp"`` → ``("attention", True)``; ``"mamba2"`` → ``("mamba2", False)``."""
    if entry.endswith(MLP_SUFFIX):
        return entry[: -len(MLP_SUFFIX)], True
    return entry, False


def layer_specs(layout: tuple[str, ...] | None, n_layer: int, d_intermediate: int) -> tuple[LayerSpec, ...]:
    """One :class:`LayerSpec` per layer. ``layout=None`` means every layer is Mamba-2, with an MLP iff
    ``d_intermediate > 0`` (the official ``MambaConfig`` convention)."""
    if layout is None:
        return tuple(LayerSpec("mamba2", d_intermediate > 0) for _ in range(n_layer))
    return tuple(LayerSpec(*split_entry(e)) for e in layout)


def evenly_spaced(n_layer: int, count: int) -> list[int]:
    """``count`` layer indices spread evenly through the stack, never first or last when avoidable
    (``evenly_spaced(64, 6)`` → [9, 18, 27, 36, 45, 54], close to mamba2attn-2.7b's attention layers)."""
    return sorted({(k + 1) * n_layer // (count + 1) for k in range(count)})
