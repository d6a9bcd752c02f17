"""Packages whose public names load on first use (PEP 562), so that importing a light part of the package (the
command line, to print ``--help``) does not import torch.

A name may also be a subpackage of the same name (``mamba2.ssd`` the function and the subpackage): the package
attribute stays the name's value, as an eager ``from .ssd import ssd`` in ``__init__`` would leave it; the import
system's binding of the subpackage (a ``setattr`` once it has loaded) is not kept. The subpackage is still reached
by ``from mamba2.ssd import …``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class LazyPackage(types.ModuleType):
    """A package module that imports ``_lazy_homes[name]`` when ``name`` is first read."""

    _lazy_homes: dict[str, str] = {}

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._lazy_homes and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        homes = type(self)._lazy_homes
        if name in homes:
            value = getattr(importlib.import_module(homes[name]), name)
            self.__dict__[name] = value
            return value
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")

    def __dir__(self) -> list[str]:
        return sorted(set(self.__dict__) | set(type(self)._lazy_homes))


def make_lazy(module_name: str, homes: dict[str, str]) -> None:
    """Turn the (already executing) module ``module_name`` into a :class:`LazyPackage` serving ``homes``:
    public name → the module that defines it."""
    cls = type(f"LazyPackage[{module_name}]", (LazyPackage,), {"_lazy_homes": dict(homes)})
    sys.modules[module_name].__class__ = cls
