"""The import rules of docs/ARCHITECTURE.md, checked on the source: no circle between modules, and no
edge that runs up the layers. Imports inside functions count like the others (a lazy import is still a
dependency); `if TYPE_CHECKING:` blocks do not (they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# bottom to top: a module may import its own layer and the layers below it
LAYERS = (
    ("base", ("_version", "errors", "atomic", "config", "eval", "launch")),
    ("wordpiece", ("wordpiece",)),
    ("data", ("data",)),
    ("model", ("model",)),
    ("train", ("train",)),
    ("workflows", ("workflows",)),
    ("apps", ("api", "inference", "quickstart", "report", "report_runs", "report_plots", "inspect_mlm", "plan")),
    ("serve", ("serve",)),
    ("cli", ("", "__main__", "cli", "commands")),
)
ROOM_LAYER = {room: i for i, (_, rooms) in enumerate(LAYERS) for room in rooms}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "bertforge").rglob("*.py"))}


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The bertforge modules `name` imports (`from bertforge import x` counts as bertforge.x when x is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            found.update(subs if subs else [base] if base in known else [])
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def layer(module: str) -> int:
    room = module.split(".")[1] if "." in module else ""
    return ROOM_LAYER[room]


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    unplaced = [m for m in modules() if (m.split(".")[1] if "." in m else "") not in ROOM_LAYER]
    assert not unplaced, f"add these modules' room to LAYERS (and docs/ARCHITECTURE.md): {unplaced}"


def test_no_import_circle():
    assert cycles(graph()) == []


def test_no_upward_import():
    g = graph()
    upward = sorted((a, b) for a, bs in g.items() for b in bs if layer(b) > layer(a))
    assert upward == [], upward


def test_the_checker_finds_circles_and_upward_edges():
    """The checker itself: a made-up graph with one circle and one upward edge."""
    g = {"bertforge.model.a": {"bertforge.model.b"}, "bertforge.model.b": {"bertforge.model.a"},
         "bertforge.data.c": {"bertforge.train.d"}, "bertforge.train.d": set()}
    assert cycles(g) == [["bertforge.model.a", "bertforge.model.b"]]
    assert [(a, b) for a, bs in g.items() for b in bs if layer(b) > layer(a)] == [
        ("bertforge.data.c", "bertforge.train.d")]
