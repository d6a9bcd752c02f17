"""A bounds check for Triton's interpreter (tests only): every address a kernel loads, stores or atomically updates
(where its mask is on) must lie inside the storage of one of that launch's tensor arguments.

On a GPU an out-of-bounds access is an illegal-address fault at best and silent corruption at worst; the
interpreter reads and writes host memory through the same addresses without complaint. With this installed (the
interpreted kernel runs of the test files do it through ``conftest``), such an access fails the kernel with
AssertionError naming the kernel, the operation and the program id.

It patches the interpreter's memory operations (Triton 3.x internals: ``GridExecutor._init_args_hst`` and the
``InterpreterBuilder`` load / store / atomic methods); :func:`install` returns False, changing nothing, where
those are missing.
"""

from __future__ import annotations

import numpy as np

_ranges: list[tuple[int, int]] = []
_kernel = [""]


def _check(ptrs, mask, what: str) -> None:
    import triton.runtime.interpreter as interp

    addresses = np.asarray(ptrs.data)
    on = np.ones(addresses.shape, dtype=bool) if mask is None else \
        np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)
    addresses = addresses[on].astype(np.uint64)
    if addresses.size == 0:
        return
    size = np.dtype(interp._get_np_dtype(ptrs.get_element_ty())).itemsize
    inside = np.zeros(addresses.shape, dtype=bool)
    for lo, hi in _ranges:
        inside |= (addresses >= lo) & (addresses + size <= hi)
    if not inside.all():
        raise AssertionError(f"{_kernel[0]}: {what} outside every tensor argument at {int((~inside).sum())} of "
                             f"{addresses.size} addresses (program {interp.interpreter_builder.grid_idx})")


def install() -> bool:
    """Patch the interpreter (idempotent). Returns whether the check is in place."""
    try:
        import triton.runtime.interpreter as interp
        grid, builder = interp.GridExecutor, interp.InterpreterBuilder
        originals = (grid._init_args_hst, builder.create_masked_load, builder.create_masked_store,
                     builder.create_atomic_rmw)
    except (ImportError, AttributeError):
        return False
    if getattr(grid._init_args_hst, "_bounds_checked", False):
        return True
    init_args, load, store, rmw = originals

    def init_args_checked(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        _ranges.clear()
        _kernel[0] = getattr(self.fn, "__name__", "kernel")
        for arg in [*args_hst, *kwargs_hst.values()]:
            if hasattr(arg, "untyped_storage"):
                storage = arg.untyped_storage()
                _ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
        return args_hst, kwargs_hst

    # the arguments after the mask differ between Triton releases (3.6 added one to loads): passed on as they come
    def load_checked(self, ptrs, mask, *rest, **kw):
        _check(ptrs, mask, "load")
        return load(self, ptrs, mask, *rest, **kw)

    def store_checked(self, ptrs, value, mask, *rest, **kw):
        _check(ptrs, mask, "store")
        return store(self, ptrs, value, mask, *rest, **kw)

    def rmw_checked(self, rmw_op, ptr, val, mask, *rest, **kw):
        _check(ptr, mask, "atomic update")
        return rmw(self, rmw_op, ptr, val, mask, *rest, **kw)

    init_args_checked._bounds_checked = True
    grid._init_args_hst = init_args_checked
    builder.create_masked_load, builder.create_masked_store = load_checked, store_checked
    builder.create_atomic_rmw = rmw_checked
    return True
