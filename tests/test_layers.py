"""The package's layers, one direction only (docs/architecture.md):

    cli -> tasks -> (tracking, training, masking, analysis, study) -> (catalog, models, data, viz) -> base

Only fgvc/tasks, fgvc/tracking and the CLI import mlflow; no module imports from a layer above
its own, and fgvc/tracking (MLflow plumbing) imports none of training, masking, analysis and
study. No two modules import each other, directly or through others (imports under
`if TYPE_CHECKING:` included). Checked on the source (every `import` statement, also inside
functions), not on a run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fgvc"

# Base modules every layer may use; then the layers, bottom to top.
BASE = {"errors", "config", "registry", "devices", "distributed", "regimes", "safeload", "files", "mlflow_names"}
LAYERS = [BASE, {"catalog", "models", "data", "viz"}, {"training", "masking", "analysis", "study", "tracking"},
          {"tasks"}, {"cli", "mlproject", "__main__"}]
# What the MLflow plumbing never imports: the work it records.
NOT_IN_TRACKING = {"training", "masking", "analysis", "study"}


def layer_of(unit: str) -> int:
    for level, units in enumerate(LAYERS):
        if unit in units:
            return level
    raise AssertionError(f"fgvc.{unit} is in no layer of this test: add it to LAYERS")


def unit_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-node.level]
                found.append(".".join([*package, node.module] if node.module else package))
            elif node.module:
                found.append(node.module)
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PACKAGE)) for p in MODULES])
def test_no_module_imports_from_a_layer_above_it(path):
    unit = unit_of(path)
    if unit == "__init__":
        return
    own = layer_of(unit)
    for name in imports(path):
        if name.split(".")[0] == "mlflow":
            assert unit in ("tasks", "tracking", "cli"), f"{path.relative_to(PACKAGE)} imports {name}"
        if not name.startswith("fgvc."):
            continue
        other = name.split(".")[1]
        assert layer_of(other) <= own, f"{path.relative_to(PACKAGE)} ({unit}) imports {name} from a layer above"
        assert not (unit == "tracking" and other in NOT_IN_TRACKING), \
            f"{path.relative_to(PACKAGE)} (MLflow plumbing) imports {name}"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_no_two_modules_import_each_other_even_through_others():
    """Every import, also inside functions and under ``if TYPE_CHECKING:``, resolved to the
    module it names (a name from a package counts as its ``__init__``)."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        targets = set()
        for imported in imports(path):
            parts = imported.split(".")
            known = next((".".join(parts[:k]) for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in paths), None)
            if known is not None and known != name:
                targets.add(known)
        graph[name] = targets
    assert import_circles(graph) == []
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # it finds one


def test_the_layer_map_names_every_unit():
    units = {unit_of(p) for p in MODULES} - {"__init__"}
    assert units <= set().union(*LAYERS)


def test_at_most_two_functions_over_sixty_lines_and_none_in_a_command():
    """Long functions are split into named steps; an algorithm may stay whole (two at most)."""
    long = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(PACKAGE)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert len(long) <= 2, long
    assert not [f for f in long if f.startswith("tasks/")], long
