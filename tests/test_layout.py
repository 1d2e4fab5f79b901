"""The layout's promises that an import can break without any other test noticing: the method stands alone,
no module imports itself back through others, no function is too long to read."""

import ast
import subprocess
import sys
from pathlib import Path

from llmm_tune.tune.family import BUILT_IN

ROOT = Path(__file__).resolve().parent.parent

SEARCH_MACHINERY = ("ray", "optuna", "pyarrow")


def test_method_package_imports_no_search_machinery():
    """A peft user imports the method (every module of llmm_tune.method, and the package root that re-exports its
    public API) without Ray, Optuna or pyarrow; checked in a fresh interpreter, as this one has them loaded."""
    code = f"""
import pkgutil, sys
import llmm_tune, llmm_tune.method
from llmm_tune import (LlmmConfig, LlmmLinear, apply_llmm, bytes_per_base_parameter, load_adapter, load_llmm,
                       merge_llmm, predict_mc, save_adapter)
modules = list(pkgutil.iter_modules(llmm_tune.method.__path__, "llmm_tune.method."))
assert len(modules) >= 5, modules
for module in modules:
    __import__(module.name)
print(sorted(name for name in {SEARCH_MACHINERY!r} if name in sys.modules))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"


def project_modules() -> dict[str, Path]:
    """Every module of the library and the families, by dotted name."""
    modules = {}
    for package in ("llmm_tune", "trainables"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project's modules `path` imports, at the top or inside a function (a lazy import still ties them)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found & set(modules)


def test_no_import_cycle_among_the_projects_modules():
    modules = project_modules()
    assert {"llmm_tune.search", "llmm_tune.tune.trainable", "llmm_tune.method.layer", "trainables.glue"} <= set(modules)
    graph = {name: imported_modules(path, modules) - {name} for name, path in modules.items()}
    assert sum(map(len, graph.values())) > 50  # the graph was read
    done: set[str] = set()

    def visit(name: str, trail: tuple[str, ...]) -> None:
        if name in trail:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(name):] + (name,)))
        if name in done:
            return
        for other in sorted(graph[name]):
            visit(other, trail + (name,))
        done.add(name)

    for name in sorted(graph):
        visit(name, ())


def test_no_function_of_the_library_or_the_families_is_over_60_lines():
    functions = []
    for path in project_modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(ROOT)}:{node.name}"))
    assert len(functions) > 100
    assert [f for f in functions if f[0] > 60] == []


def test_a_recipe_imports_no_other_recipe_and_the_library_imports_no_recipe():
    """A recipe (a built-in family and the modules of `trainables` it alone reaches) takes what it shares with
    others from `llmm_tune.train`, so each changes alone; the library reaches a family by name (`load_family`)."""
    modules = project_modules()
    graph = {name: imported_modules(path, modules) - {name} for name, path in modules.items()}
    families = {f"trainables.{name}" for name in BUILT_IN}
    assert families <= set(graph)

    def reached(family: str) -> set[str]:
        found, todo = set(), [family]
        while todo:
            new = {m for m in graph[todo.pop()] if m.startswith("trainables.")} - found
            found |= new
            todo += new
        return found

    recipes = {family: reached(family) for family in sorted(families)}
    assert all(not reach & families for reach in recipes.values()), recipes
    shared = sorted(m for m in modules if sum(m in r for r in recipes.values()) > 1)
    assert shared == [], f"{shared} serve several recipes: move what they share into llmm_tune/train/"
    assert sorted(name for name in graph if name.startswith("llmm_tune") and any(
        m.split(".")[0] == "trainables" for m in graph[name])) == []


def test_commands_stand_on_the_library_and_import_no_other_command():
    """A command (each of `llmm_tune.cli.COMMANDS`) parses, calls the library and prints: no command imports another,
    and no library module imports a command, so a test and a command reach results the same way."""
    from llmm_tune.cli import COMMANDS

    modules = project_modules()
    commands = {f"llmm_tune.{name}" for name in COMMANDS}
    assert commands <= set(modules)
    graph = {name: imported_modules(path, modules) - {name} for name, path in modules.items()}
    assert sum(map(len, graph.values())) > 50  # the graph was read
    reaching = {name: sorted(graph[name] & commands) for name in sorted(graph) if graph[name] & commands}
    assert reaching == {}, f"these import a command: {reaching}; move what they share into the library"
    lengths = {name: len(modules[name].read_text().splitlines()) for name in ("llmm_tune.export", "llmm_tune.search")}
    assert all(length < 250 for length in lengths.values()), lengths
