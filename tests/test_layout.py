"""The layout's rules (ARCHITECTURE.md), checked on the source: the library's import graph is a
tree, the library never imports an application, and only the engine touches DeepSpeed."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

from tests.helpers import ROOT

APPLICATIONS = ("train", "eval", "data_prep", "demo", "bench", "tools", "tests")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path, type_only: bool = False) -> set[str]:
    """Modules ``path`` imports when it runs, at any depth (function-local ones too); with
    ``type_only``, also those under ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if type_only:
            break
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for child in node.body for n in ast.walk(child)}
    found = set()
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else None
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    (package or module_name(path)).split(".")[: -node.level + 1 or None]
                    + ([base] if base else [])
                )
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # submodules imported by name
    return found


def library_graph(
    packages: tuple[str, ...] = ("flamingo",), type_only: bool = False
) -> dict[str, set[str]]:
    paths = [p for package in packages for p in (ROOT / package).rglob("*.py")]
    modules = {module_name(p): p for p in paths}
    return {
        m: {i for i in imports(p, type_only) if i in modules and i != m} for m, p in modules.items()
    }


FIRST_PARTY = ("flamingo", "eval", "data_prep", "bench", "demo")


def test_no_import_circle_counting_type_only_and_function_local_imports():
    """Not in the library, nor in the applications' packages: a module that needs another
    only for its types still depends on it (a circle of those is one concept split in two)."""
    graph = library_graph(FIRST_PARTY, type_only=True)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_each_layer_imports_only_the_layers_below_it():
    """core (the model and its parts) <- data <- training <- applications."""
    for module, deps in library_graph().items():
        if module.startswith("flamingo.training"):
            continue
        bad = {d for d in deps if d.startswith("flamingo.training")}
        if not module.startswith("flamingo.data"):
            bad |= {d for d in deps if d.startswith("flamingo.data")}
        assert not bad, f"{module} imports {sorted(bad)}: a layer above it (ARCHITECTURE.md)"


def test_the_library_never_imports_an_application():
    for path in (ROOT / "flamingo").rglob("*.py"):
        bad = {i for i in imports(path) if i.split(".")[0] in APPLICATIONS}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_only_the_engine_imports_deepspeed():
    engine = {"flamingo/training/engine.py", "flamingo/training/ops.py"}  # ops: its C++ builds
    for path in (ROOT / "flamingo").rglob("*.py"):
        if path.relative_to(ROOT).as_posix() in engine:
            continue
        bad = {i for i in imports(path) if i.split(".")[0] == "deepspeed"}
        assert not bad, f"{path.relative_to(ROOT)} imports deepspeed: that is the engine's"


def test_no_module_reads_deepspeed_attributes_outside_the_engine():
    # ZeRO marks its parameters with ds_* attributes (ds_status, ds_id, ds_numel, ...); what the
    # model must do under an engine comes from the engine's ExecutionPolicy instead
    for path in (ROOT / "flamingo").rglob("*.py"):
        if path.relative_to(ROOT).as_posix() == "flamingo/training/engine.py":
            continue
        tree = ast.parse(path.read_text())
        names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        names |= {
            n.value
            for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
        }
        bad = sorted(n for n in names if n.startswith("ds_") or n == "zero_optimization_stage")
        assert not bad, f"{path.relative_to(ROOT)} reads {bad}: ask the engine's policy instead"


def test_lint_sees_every_tracked_python_file():
    tracked = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    ruff = Path(__import__("sys").executable).with_name("ruff")
    listed = subprocess.run(
        [str(ruff), "check", "--show-files", "."], cwd=ROOT, capture_output=True, text=True
    ).stdout
    seen = {
        str(Path(line.strip()).resolve().relative_to(ROOT))
        for line in listed.splitlines()
        if line.strip().endswith(".py")
    }
    missing = sorted(set(tracked) - seen)
    assert not missing, f"ruff never checks {missing} (a .gitignore pattern hides them?)"
