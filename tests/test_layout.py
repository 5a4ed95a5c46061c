"""The package's layers: imports point down, never in a circle, and never hide inside functions."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "slowllama"
# a package (or top-level module) of slowllama may import those of a lower rank, and itself
RANKS = {
    "errors": 0,
    "sizes": 1, "jsonfile": 1, "faults": 1,
    "model": 2, "optim": 2,
    "store": 3, "data": 3,
    "engine": 4, "formats": 4, "bench": 4,
    "train": 5,
    "settings": 6, "config_file": 6,
    "commands": 7,
    "cli": 8,
    "__main__": 9, "testing": 9,
}


def module_name(path: Path) -> str:
    return ".".join(("slowllama", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


def imports(path: Path) -> list[tuple[str, bool]]:
    """(slowllama module imported, whether the import statement is inside a function) of a source file."""
    tree = ast.parse(path.read_text())
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("slowllama"):
            for alias in node.names:  # `from slowllama.store import safetensors_io` imports a module
                full = f"{node.module}.{alias.name}"
                as_module = (REPO / Path(*full.split("."))).with_suffix(".py").exists()
                out.append((full if as_module else node.module, id(node) in inside))
        elif isinstance(node, ast.Import):
            out += [(a.name, id(node) in inside) for a in node.names if a.name.startswith("slowllama")]
    return out


GRAPH = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> str:
    return module.split(".")[1]


def test_every_package_has_a_rank():
    assert {layer(m) for m in GRAPH if m != "slowllama"} <= set(RANKS)


def test_imports_point_down():
    # (the package itself, slowllama/__init__.py, holds only __version__ and imports nothing)
    assert not [target for target, _ in GRAPH["slowllama"]]
    upward = [(m, target) for m, targets in GRAPH.items() if m != "slowllama" for target, _ in targets
              if target != "slowllama" and layer(target) != layer(m) and RANKS[layer(target)] >= RANKS[layer(m)]]
    assert not upward


def test_no_import_inside_a_function():
    assert not [(m, target) for m, targets in GRAPH.items() for target, inside in targets if inside]


def test_no_import_cycle():
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target, _ in GRAPH.get(module, []):
            target = target if target in GRAPH else next((m for m in GRAPH if target.startswith(m + ".")), target)
            assert state.get(target) != "open", " -> ".join(path + [module, target])
            if target in GRAPH and target not in state:
                visit(target, path + [module])
        state[module] = "done"

    for module in GRAPH:
        if module not in state:
            visit(module, [])
