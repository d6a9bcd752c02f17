"""The package's import structure: no import cycles, and dependencies flow one way (docs/design.md §6).

Static checks only: every ``.py`` file under ``mamba2/`` is parsed with :mod:`ast` (the package is never
imported here), so imports inside functions, methods, ``try``/``if`` blocks (``if TYPE_CHECKING:`` included:
a type-only dependency is still a dependency) count like top-level ones. Collected:

- ``import mamba2.a.b`` → module ``mamba2.a.b``;
- ``from mamba2.a import b`` → ``mamba2.a.b`` when that file or package exists, else ``mamba2.a`` (``b`` is
  then a name defined in ``mamba2/a/__init__.py``), decided per imported name;
- relative imports (``from . import b``, ``from ..a import b``), resolved against the importing file;
- ``importlib.import_module("mamba2.a")`` / ``import_module(...)`` / ``__import__(...)`` with a literal string
  (and a literal ``package=`` for a relative name).

Files map to modules as Python does: ``mamba2/ssd/__init__.py`` → ``mamba2.ssd``, ``mamba2/ssd/chunked.py``
→ ``mamba2.ssd.chunked``. The checker takes a root directory and a package name, so the tests at the bottom
run it on small synthetic packages and make sure that it reports what it should.
"""

from __future__ import annotations

import ast
import dataclasses
from collections import defaultdict, deque
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "mamba2"


# ------------------------------------------------------------------------------------------------------------
# Layering: which directions are forbidden. Lowest floor first:
#   errors / layout / fsutil / kernels / devices → config → ssd → layers → models
#   → generation / training / interop / checkpoints / data / tokenizer / evaluation / … → cli (→ __main__)
# A name covers the module and everything under it ("mamba2.ssd" covers "mamba2.ssd.triton.backend"). Names
# of modules that do not exist (yet) are fine: a rule about them holds trivially.
# To place a new module: add it to one group below (test_every_module_is_on_a_floor says when one is missing).
# To add a rule: add a row to LAYER_RULES.
# ------------------------------------------------------------------------------------------------------------

FLOOR0 = ("mamba2.errors", "mamba2.layout", "mamba2.fsutil", "mamba2.kernels", "mamba2.lazy", "mamba2.devices")
CONFIG = ("mamba2.config",)
SSD = ("mamba2.ssd",)
LAYERS = ("mamba2.layers",)
MODELS = ("mamba2.models",)
CONSUMERS = ("mamba2.serving", "mamba2.generation", "mamba2.training", "mamba2.train_config", "mamba2.interop",
             "mamba2.checkpoints", "mamba2.data", "mamba2.tokenizer", "mamba2.evaluation", "mamba2.plots",
             "mamba2.lm_eval_adapter", "mamba2.distributed", "mamba2.metrics",
             "mamba2.sizing", "mamba2.lora", "mamba2.experiments")
CLI = ("mamba2.cli",)
ENTRY = ("mamba2", "mamba2.__main__")      # the package __init__ (re-exports) and `python -m mamba2`

ABOVE_MODELS = CONSUMERS + CLI
ABOVE_LAYERS = MODELS + ABOVE_MODELS
ABOVE_SSD = LAYERS + ABOVE_LAYERS
ABOVE_CONFIG = SSD + ABOVE_SSD
ABOVE_FLOOR0 = CONFIG + ABOVE_CONFIG


@dataclasses.dataclass(frozen=True)
class Rule:
    """Nothing in ``importers`` (minus ``exempt``) may import anything in ``forbidden``."""
    importers: tuple[str, ...]
    forbidden: tuple[str, ...]
    why: str
    exempt: tuple[str, ...] = ()


LAYER_RULES = (
    #    importers            must not import          why
    Rule(FLOOR0,              ABOVE_FLOOR0,            "floor 0 (errors, layout, fsutil, kernels) sits at the bottom"),
    Rule(CONFIG,              ABOVE_CONFIG,            "config imports only floor 0"),
    Rule(SSD,                 ABOVE_SSD,               "ssd imports nothing from layers or above"),
    Rule(LAYERS,              ABOVE_LAYERS,            "layers import nothing from models or above"),
    Rule(MODELS,              ABOVE_MODELS,            "models import none of their users"),
    Rule(("mamba2.interop",), ("mamba2.checkpoints", "mamba2.training", "mamba2.train_config") + CLI,
                                                       "interop sits below checkpoints and training"),
    Rule(("mamba2.serving",), ("mamba2.generation", "mamba2.training", "mamba2.lm_eval_adapter"),
                                                       "generation and the evaluators are built on serving"),
    Rule(("mamba2.distributed",), ("mamba2.training", "mamba2.checkpoints", "mamba2.serving") + CLI,
                                                       "training is built on distributed, not the reverse"),
    Rule(("mamba2",),         CLI,                     "only the entry point imports the CLI",
         exempt=CLI + ("mamba2.__main__",)),
)
"""The table that test_layers_flow_one_way holds (docs/design.md §6)."""


# ------------------------------------------------------------------------------------------------------------
# The checker
# ------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Import:
    """One import of a package module: ``importer`` (module) imports ``target`` at ``path:line``."""
    importer: str
    target: str
    path: str          # relative to the root, with "/" separators
    line: int
    via: str = ""      # for an implied edge to a package: the submodule actually imported

    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def describe(self) -> str:
        what = f"{self.target} (runs its __init__ to import {self.via})" if self.via else self.target
        return f"{self.where()}: {self.importer} imports {what}"


def in_group(module: str, names: tuple[str, ...]) -> bool:
    """True when ``module`` is one of ``names`` or inside one of them."""
    return any(module == n or module.startswith(n + ".") for n in names)


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Module name → file, for every ``.py`` file under ``root/package``."""
    out = {}
    for f in sorted((root / package).rglob("*.py")):
        if "__pycache__" in f.parts:
            continue
        parts = list(f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def _literal_str(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _resolve_relative(name: str, level: int, importer: str, is_package: bool) -> str | None:
    """The absolute module of ``from <level dots><name> import …`` written in ``importer``."""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if level > 1:
        if level - 1 > len(base) - 1:
            return None                     # beyond the top-level package
        base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def collect_imports(root: Path, package: str) -> tuple[list[Import], set[str]]:
    """Every import of a ``package`` module in every file under ``root/package``, and the set of modules."""
    files = module_files(root, package)
    modules = set(files)
    imports: list[Import] = []
    seen: set[Import] = set()

    def ours(name: str | None) -> bool:
        return name is not None and (name == package or name.startswith(package + "."))

    for module, f in files.items():
        rel = f.relative_to(root).as_posix()
        is_package = f.name == "__init__.py"
        tree = ast.parse(f.read_text(encoding="utf-8"), filename=str(f))

        def add(target: str, line: int) -> None:
            imp = Import(module, target, rel, line)
            if ours(target) and imp not in seen:
                seen.add(imp)
                imports.append(imp)

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                base = (node.module if node.level == 0
                        else _resolve_relative(node.module or "", node.level, module, is_package))
                if not ours(base):
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    add(sub if sub in modules else base, node.lineno)
            elif isinstance(node, ast.Call):
                fn = node.func
                fname = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else None
                if fname not in ("import_module", "__import__") or not node.args:
                    continue
                name = _literal_str(node.args[0])
                if name is None:
                    continue
                if name.startswith("."):
                    pkg = _literal_str(node.args[1]) if len(node.args) > 1 and fname == "import_module" else None
                    pkg = pkg or next((_literal_str(k.value) for k in node.keywords if k.arg == "package"), None)
                    if pkg is None:
                        continue
                    level = len(name) - len(name.lstrip("."))
                    name = _resolve_relative(name.lstrip("."), level, pkg, is_package=True)
                add(name, node.lineno)
    return imports, modules


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def module_graph(imports: list[Import]) -> dict[str, dict[str, list[Import]]]:
    """importer → target → the imports that make the edge.

    Rule for implied edges. ``import a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``. Written in module M,
    an import of T makes the edge M → T, and also M → P for each package P above T *that does not contain M*
    (and is not M). The packages that contain M are always already imported (or being imported) when M runs,
    so re-touching them runs nothing: ``mamba2/ssd/chunked.py`` importing ``mamba2.ssd.common`` does not
    depend on ``mamba2/ssd/__init__.py``, and counting it would report every package whose ``__init__``
    re-exports its submodules as a loop. An import from outside the package runs its ``__init__`` first,
    which is a real dependency: if ``mamba2.checkpoints`` imports ``mamba2.interop.formats``, it also runs
    ``mamba2/interop/__init__.py``, and that ``__init__`` importing a module that imports
    ``mamba2.checkpoints`` is a loop. An explicit import of a containing package
    (``from mamba2.ssd import register_backend`` in ``mamba2/ssd/triton/__init__.py``) is always an edge: it
    needs names that the parent's ``__init__`` may not have defined yet.
    """
    graph: dict[str, dict[str, list[Import]]] = defaultdict(lambda: defaultdict(list))
    for imp in imports:
        graph[imp.importer][imp.target].append(imp)        # collect_imports has removed duplicates
        inside = set(_ancestors(imp.importer))
        for pkg in _ancestors(imp.target):
            if pkg not in inside and pkg != imp.importer:
                graph[imp.importer][pkg].append(dataclasses.replace(imp, target=pkg, via=imp.target))
    return graph


def _sccs(graph: dict[str, dict[str, list[Import]]]) -> list[list[str]]:
    """Strongly connected components (Tarjan, iterative)."""
    nodes = sorted(set(graph) | {t for e in graph.values() for t in e})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, {}))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, {})))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                out.append(sorted(comp))
    return out


def _shortest_path(graph, src: str, dst: str, allowed: set[str]) -> list[str] | None:
    prev = {src: None}
    queue = deque([src])
    while queue:
        v = queue.popleft()
        if v == dst:
            path = []
            while v is not None:
                path.append(v)
                v = prev[v]
            return path[::-1]
        for w in sorted(graph.get(v, {})):
            if w in allowed and w not in prev:
                prev[w] = v
                queue.append(w)
    return None


def find_cycles(root: Path, package: str) -> list[str]:
    """One report per cycle: ``a -> b -> a`` and, under it, the import behind each arrow.

    A cycle is a self-import or a strongly connected component of more than one module. Each component is shown
    as a set of cycles that together use every edge inside it (for each edge u → v, u → v plus the shortest way
    back from v to u), so nothing in a loop goes unnamed.
    """
    imports, _ = collect_imports(root, package)
    graph = module_graph(imports)
    cycles: dict[tuple[str, ...], str] = {}

    def record(cycle: list[str]) -> None:       # cycle = [a, b, …] meaning a -> b -> … -> a
        i = cycle.index(min(cycle))
        cycle = cycle[i:] + cycle[:i]
        key = tuple(cycle)
        if key in cycles:
            return
        lines = [" -> ".join(cycle + [cycle[0]])]
        for a, b in zip(cycle, cycle[1:] + cycle[:1]):
            for imp in graph[a][b]:
                lines.append(f"    {imp.describe()}")
        cycles[key] = "\n".join(lines)

    for v, edges in graph.items():
        if v in edges:
            record([v])
    for comp in _sccs(graph):
        if len(comp) < 2:
            continue
        members = set(comp)
        for u in comp:
            for v in sorted(graph.get(u, {})):
                if v in members and v != u:
                    back = _shortest_path(graph, v, u, members)
                    record([u] + back[:-1])
    return [cycles[k] for k in sorted(cycles)]


def layer_violations(root: Path, package: str, rules=LAYER_RULES) -> list[str]:
    """One message per explicit import that a rule forbids: file, line, importer, target and the rule."""
    imports, _ = collect_imports(root, package)
    out = []
    for imp in imports:
        for rule in rules:
            if (in_group(imp.importer, rule.importers) and not in_group(imp.importer, rule.exempt)
                    and in_group(imp.target, rule.forbidden)):
                out.append(f"{imp.where()}: {imp.importer} imports {imp.target}, against the rule "
                           f"'{rule.why}' ({', '.join(rule.importers)} must not import "
                           f"{', '.join(rule.forbidden)})")
    return sorted(set(out))


# ------------------------------------------------------------------------------------------------------------
# The tests on mamba2
# ------------------------------------------------------------------------------------------------------------

def test_no_import_cycles():
    """No module of mamba2 reaches itself through imports (rule for package __init__s: module_graph)."""
    cycles = find_cycles(REPO, PACKAGE)
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(cycles)


def test_layers_flow_one_way():
    """Every import in mamba2 obeys LAYER_RULES."""
    bad = layer_violations(REPO, PACKAGE)
    assert not bad, f"{len(bad)} import(s) against the layering:\n" + "\n".join(bad)


def test_every_module_is_on_a_floor():
    """Every top-level module of mamba2 belongs to a group of the table, so that the rules see it."""
    floors = FLOOR0 + CONFIG + SSD + LAYERS + MODELS + CONSUMERS + CLI
    _, modules = collect_imports(REPO, PACKAGE)
    loose = sorted(m for m in modules if m not in ENTRY and not in_group(m, floors))
    assert not loose, f"modules in no group of tests/test_structure.py (add each to one): {loose}"


def test_checker_sees_the_package():
    """Guard against a checker that passes because it finds nothing."""
    imports, modules = collect_imports(REPO, PACKAGE)
    assert {"mamba2", "mamba2.ssd", "mamba2.layers", "mamba2.models", "mamba2.config"} <= modules
    assert any(i.importer == "mamba2.models.lm" and i.target.startswith("mamba2.layers") for i in imports)


# ------------------------------------------------------------------------------------------------------------
# The checker on synthetic packages: it must report every kind of fault, and nothing in a clean package
# ------------------------------------------------------------------------------------------------------------

def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return root


_BAD = {
    "pkg/__init__.py": "",
    # a two-file loop, one side imported inside a try block
    "pkg/low/__init__.py": "",
    "pkg/low/a.py": "import pkg.low.b\n",
    "pkg/low/b.py": "try:\n    from pkg.low.a import thing\nexcept ImportError:\n    pass\n",
    # a loop through a package __init__ with a function-level import (the ssd/triton registration pattern)
    "pkg/mid/__init__.py": "def register_backend():\n    pass\n\n\ndef _late():\n"
                           "    from pkg.mid.plugin import register\n",
    "pkg/mid/plugin/__init__.py": "def register():\n    from pkg.mid import register_backend\n",
    # a loop through an __init__ that runs because another module imports one of its submodules
    "pkg/x.py": "def f():\n    import importlib\n    importlib.import_module('pkg.y.leaf')\n",
    "pkg/y/__init__.py": "from pkg import x\n",
    "pkg/y/leaf.py": "",
    # a self-import, relative
    "pkg/selfie.py": "from . import selfie\n",
    # upward imports: inside an if block and a method, and through a relative import
    "pkg/low/c.py": "if True:\n    from pkg import top\n",
    "pkg/low/d.py": "class K:\n    def m(self):\n        from ..top import name\n",
    "pkg/top.py": "from .low import a\n",
}

_BAD_RULES = (Rule(("pkg.low",), ("pkg.top",), "low sits below top"),)


def test_checker_reports_cycles(tmp_path):
    cycles = find_cycles(_write(tmp_path, _BAD), "pkg")
    heads = {c.splitlines()[0] for c in cycles}
    assert heads == {
        "pkg.low.a -> pkg.low.b -> pkg.low.a",
        "pkg.mid -> pkg.mid.plugin -> pkg.mid",
        "pkg.x -> pkg.y -> pkg.x",
        "pkg.selfie -> pkg.selfie",
    }, cycles
    text = "\n".join(cycles)
    assert "pkg/low/b.py:2: pkg.low.b imports pkg.low.a" in text
    assert "pkg/mid/__init__.py:6: pkg.mid imports pkg.mid.plugin" in text
    assert "pkg/mid/plugin/__init__.py:2: pkg.mid.plugin imports pkg.mid" in text
    assert "pkg/x.py:3: pkg.x imports pkg.y (runs its __init__ to import pkg.y.leaf)" in text


def test_checker_reports_upward_imports(tmp_path):
    bad = layer_violations(_write(tmp_path, _BAD), "pkg", _BAD_RULES)
    assert len(bad) == 2, bad
    assert bad[0].startswith("pkg/low/c.py:2: pkg.low.c imports pkg.top, against the rule 'low sits below top'")
    assert bad[1].startswith("pkg/low/d.py:3: pkg.low.d imports pkg.top, against the rule 'low sits below top'")


def test_checker_passes_a_clean_package(tmp_path):
    """A package __init__ that re-exports submodules which import each other and the parent's siblings is no
    loop; neither is a submodule that imports its parent when the parent does not import it back."""
    clean = {
        "pkg/__init__.py": "from pkg.core import f\nfrom pkg.core.util import g\n",
        "pkg/core/__init__.py": "from pkg.core.impl import f\n",
        "pkg/core/impl.py": "from pkg.core.util import g\nfrom pkg.base import h\n",
        "pkg/core/util.py": "import pkg.base\n",
        "pkg/core/extra.py": "from pkg.core import f\n",
        "pkg/base.py": "import os\nimport importlib\nimportlib.import_module('json')\n",
        "pkg/app.py": "from pkg.core import impl, f\nfrom . import base\n",
    }
    root = _write(tmp_path, clean)
    assert find_cycles(root, "pkg") == []
    rules = (Rule(("pkg.base",), ("pkg.core", "pkg.app"), "base at the bottom"),
             Rule(("pkg.core",), ("pkg.app",), "core below app"))
    assert layer_violations(root, "pkg", rules) == []
    imports, _ = collect_imports(root, "pkg")
    targets = {(i.importer, i.target) for i in imports}
    assert ("pkg.app", "pkg.core.impl") in targets and ("pkg.app", "pkg.core") in targets
    assert ("pkg.app", "pkg.base") in targets
