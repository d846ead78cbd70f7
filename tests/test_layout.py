"""The import graph of ddt/ and benchmarks/: no cycles between modules or between ddt's packages, and
the library knows nothing about Hydra.

Every `import` and `from ... import` statement counts, wherever it is (module level, inside a
function, under `if TYPE_CHECKING:`): a lazy import still ties two modules together. Not counted:
the implicit import of a module's parent package (`ddt.data.latents` runs `ddt/data/__init__.py`
first), which is how Python packages work rather than a dependency one chose.
"""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("ddt", "benchmarks")


def module_name(path: Path) -> str:
    """ddt/data/latents.py -> ddt.data.latents, ddt/models/__init__.py -> ddt.models."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of the packages, by dotted name."""
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imported_names(path: Path, name: str) -> set[str]:
    """The dotted names a module imports: `import a.b` gives a.b, `from a import b, c` gives a.b and a.c."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of the packages it imports; a name is its longest prefix that is a module
    (ddt.data.pixels.to_uint8 -> ddt.data.pixels, ddt.models.DDT -> ddt.models, the package)."""
    known = modules()

    def resolve(dotted: str) -> str | None:
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in known:
                return ".".join(parts[:end])
        return None

    graph = {}
    for name, path in known.items():
        targets = {resolve(d) for d in imported_names(path, name)}
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def external_importers(prefix: str) -> set[str]:
    """The modules of the packages that import `prefix` or one of its submodules."""
    return {name for name, path in modules().items()
            if any(d == prefix or d.startswith(prefix + ".") for d in imported_names(path, name))}


def component(module: str) -> str:
    """ddt's subpackages as one node each (ddt.data.latents -> ddt.data); other modules stand alone."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "ddt" and len(parts) > 2 else module


def collapse(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph between components."""
    out: dict[str, set[str]] = {}
    for source, targets in graph.items():
        out.setdefault(component(source), set()).update(component(t) for t in targets)
    return {node: targets - {node} for node, targets in out.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_graph_sees_lazy_imports():
    graph = import_graph()
    assert "ddt.checkpoint" in graph["ddt.models.ddt"]  # imported inside a function only
    assert "ddt.models" in graph["ddt.train"]  # `from ddt.models import compile_model`: the package
    assert "ddt.checkpoint" in graph["benchmarks.sharing"]  # `from ddt import checkpoint`: the module


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_packages():
    cycle = find_cycle(collapse(import_graph()))
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle)


def test_layers():
    graph = collapse(import_graph())
    assert "ddt.models" not in graph["ddt.data"]  # the latent cache takes any encoder (ddt.data.latents.Encoder)
    assert graph["ddt.images"] == set()  # below both ddt.data and ddt.models
    library = {node: targets for node, targets in graph.items() if node.startswith("ddt")}
    assert not any(t.startswith("benchmarks") for targets in library.values() for t in targets)


def test_library_knows_nothing_about_hydra():
    assert {m for m in external_importers("hydra") if m.startswith("ddt")} == set()
    # omegaconf only where the composed config is read: the schema, its checks and the stage runner.
    assert {m for m in external_importers("omegaconf") if m.startswith("ddt")} <= {"ddt.config", "ddt.schema",
                                                                                   "ddt.runner"}


def test_files_written_through_temp_and_rename_follow_the_umask(tmp_path):
    import os

    from ddt.checkpoint import atomic_write_json

    previous = os.umask(0o022)
    try:
        atomic_write_json({"a": 1}, tmp_path / "results.json")
        os.umask(0o077)
        atomic_write_json({"a": 2}, tmp_path / "private.json")
    finally:
        os.umask(previous)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o644  # as launch.log and .hydra/ are
    assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600
