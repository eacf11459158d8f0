"""The dependency rule (docs/architecture.md, "Layers"), checked over the import graph.

Every import counts: top-level, inside functions, under TYPE_CHECKING.  A module may import
its own layer and the layers below it, never one above; kernel, host and export are siblings
that do not import each other; the kernel layer imports nothing of the domain (only the
foundations); and no two modules import each other, directly or round a longer cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "pyflow"

#: layer of each module, lowest first: foundations <- model <- config <- kernel/host/export <- agent
#: <- service <- cli.  A package name covers its modules.
LAYERS: dict[str, tuple[int, str]] = {
    "pyflow": (0, "foundations"), "pyflow.errors": (0, "foundations"), "pyflow.units": (0, "foundations"),
    "pyflow.paths": (0, "foundations"), "pyflow.files": (0, "foundations"), "pyflow.text": (0, "foundations"),
    "pyflow.log": (0, "foundations"),
    "pyflow.records": (1, "model"), "pyflow.sweep": (1, "model"), "pyflow.fields": (1, "model"),
    "pyflow.links": (1, "model"),
    "pyflow.config": (2, "config"), "pyflow.configfile": (2, "config"), "pyflow.routeros": (2, "config"),
    "pyflow.layering": (2, "config"),
    "pyflow.kernel": (3, "kernel"), "pyflow.host": (3, "host"), "pyflow.interfaces": (3, "host"),
    "pyflow.enrich": (3, "host"), "pyflow.export": (3, "export"), "pyflow.analytics": (3, "analytics"),
    "pyflow.agent": (4, "agent"),
    "pyflow.runner": (5, "service"), "pyflow.control": (5, "service"), "pyflow.metrics": (5, "service"),
    "pyflow.follow": (5, "service"),
    "pyflow.cli": (6, "cli"), "pyflow.commands": (6, "cli"), "pyflow.collect": (6, "cli"),
}  # fmt: skip


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def layer(module: str) -> tuple[int, str]:
    while module not in LAYERS:
        module = module.rsplit(".", 1)[0]
    return LAYERS[module]


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """Every pyflow module ``name`` imports, wherever the import statement is."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "pyflow")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            if base.split(".")[0] != "pyflow":
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield full if full in known else base


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in imports(name, path, known) if m != name} for name, path in known.items()}


def test_every_module_has_a_layer() -> None:
    for name in modules():
        assert layer(name)


def test_imports_point_down() -> None:
    bad = []
    for name, deps in sorted(graph().items()):
        level, kind = layer(name)
        for dep in sorted(deps):
            dep_level, dep_kind = layer(dep)
            if dep_level > level or (dep_level == level and dep_kind != kind and level == 3):
                bad.append(f"{name} ({kind}) imports {dep} ({dep_kind})")
            elif kind == "kernel" and dep_kind not in ("kernel", "foundations"):
                bad.append(f"{name} (kernel) imports {dep} ({dep_kind}): the kernel layer knows no domain")
    assert bad == []


def test_no_import_cycles() -> None:
    g = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for start in sorted(g):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_the_flow_cache_seam_has_a_real_and_an_in_memory_side() -> None:
    """pyflow.agent.FlowCache: what the agent needs of the kernel, and nothing else.  The kernel's
    FlowMeter and the tests' MemoryFlowCache both offer every member, with the same parameters."""
    import inspect

    from pyflow.agent import FlowCache
    from pyflow.kernel.loader import FlowMeter
    from tests.unit.fakes import MemoryFlowCache

    members = [n for n, v in vars(FlowCache).items() if callable(v) and not n.startswith("_")]
    assert len(members) == 12
    for impl in (FlowMeter, MemoryFlowCache):
        for name in members:
            want = list(inspect.signature(getattr(FlowCache, name)).parameters)
            assert list(inspect.signature(getattr(impl, name)).parameters) == want, (impl, name)


def test_functions_are_short_enough_to_read_at_once() -> None:
    """Every function and method of pyflow is at most 60 lines (docstring included)."""
    long = []
    for name, path in sorted(modules().items()):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > 60:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []


def test_only_the_build_module_imports_bcc() -> None:
    importers = set()
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(n.split(".")[0] == "bcc" for n in names):
                importers.add(name)
    assert importers == {"pyflow.kernel.build"}
