"""The package's layout: subpackages by stage, imports only go down, no circle, no module over about 600 lines.

Every `import` and `from ... import` of deeplab's own modules is read with `ast`, including those inside functions
(a lazy import is still a dependency). docs/design.md draws the same layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import deeplab

PACKAGE = Path(deeplab.__file__).resolve().parent

# Bottom to top. A module may import from its own subpackage and from any lower layer; packages on one layer (convert
# and deploy, training and serve) do not import each other. The top-level `deeplab` (the public API) and `__main__` may import anything.
LAYERS = (("models",), ("data",), ("convert", "deploy"), ("inference",), ("training", "serve"), ("cli",))
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
MAX_LINES = 620


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The deeplab modules (or packages) `path` imports, as absolute dotted names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "deeplab"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "deeplab":
                target = node.module
            else:
                continue
            for alias in node.names:  # `from . import pointrend` imports a module
                sub = f"{target}.{alias.name}"
                found.add(sub if _exists(sub) else target)
    return found


def _exists(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


def test_every_module_lives_in_a_stage_subpackage():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "__main__.py"], f"modules beside the subpackages: {top}"
    stages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert stages == sorted(RANK), stages


def test_imports_only_go_down_the_layers():
    climbs = []
    for module, imported in _graph().items():
        stage = _stage(module)
        if stage is None:  # deeplab/__init__.py and __main__.py: the API over everything
            continue
        for target in imported:
            other = _stage(target)
            if target == "deeplab" or other is None:
                climbs.append(f"{module} imports {target} (the top-level API)")
            elif other != stage and RANK[other] >= RANK[stage]:
                climbs.append(f"{module} ({stage}) imports {target} ({other})")
    assert not climbs, "\n".join(sorted(climbs))


def test_no_two_modules_import_each_other_directly_or_round_a_circle():
    graph = _graph()
    # A package's __init__ that re-exports its modules is not a circle with them.
    edges = {m: {t for t in ts if t in graph and not m.startswith(t + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not circles, "\n".join(circles)


def test_no_module_is_over_about_600_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_layer_check_sees_a_climb_and_a_circle(tmp_path):
    # The checks above must be able to fail: an import written into a lower layer is found by the same reader.
    probe = PACKAGE / "models" / "_probe_climb.py"
    probe.write_text("from ..training.loop import fit\n\n\ndef f():\n    from deeplab.cli import main\n")
    try:
        found = _imports(probe)
    finally:
        probe.unlink()
    assert found == {"deeplab.training.loop", "deeplab.cli"}
