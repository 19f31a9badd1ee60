"""Specification of the code's shape: packages depend one way, modules form no import cycle,
DeepSpeed is reached from one package of lm (and process-group set-up), no module passes 400 lines.

    core  <-  data_prep, launch  <-  lm

Every import counts, function-local ones too: a local import may defer a heavy third-party
library, never dodge a cycle between our own modules.
"""

import ast
from pathlib import Path

import pytest

from conftest import REPO

LAYER = {"core": 0, "data_prep": 1, "launch": 1, "lm": 2}
ENGINE = "lm.engine"  # the package that talks to DeepSpeed
SET_UP = "lm.distributed"  # process-group set-up: deepspeed.init_distributed
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in LAYER for p in sorted((REPO / package).rglob("*.py"))}


def imported_names(path: Path) -> set[str]:
    """Every module name an import statement of the file mentions (absolute imports only)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def project_imports(name: str) -> set[str]:
    return {m for m in imported_names(MODULES[name]) if m in MODULES and m != name}


def test_every_package_imports_only_the_layers_below_it():
    reverse = [
        f"{name} imports {target}"
        for name in MODULES
        for target in project_imports(name)
        if (a := name.split(".")[0]) != (b := target.split(".")[0]) and LAYER[a] <= LAYER[b]
    ]
    assert not reverse, "imports against the layering core <- data_prep, launch <- lm:\n" + "\n".join(reverse)


def test_no_import_cycle_between_modules():
    graph = {name: project_imports(name) for name in MODULES}
    state, stack, cycles = {}, [], []

    def visit(node):  # depth-first; a grey node met again closes a cycle
        state[node] = "grey"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "grey":
                cycles.append(" -> ".join(stack[stack.index(target) :] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "black"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def imports_deepspeed(name: str) -> bool:
    return any(m == "deepspeed" or m.startswith("deepspeed.") for m in imported_names(MODULES[name]))


def test_deepspeed_is_imported_by_the_engine_and_process_group_set_up_only():
    users = {name for name in MODULES if name.startswith("lm") and imports_deepspeed(name)}
    outside = sorted(u for u in users if u != SET_UP and u != ENGINE and not u.startswith(ENGINE + "."))
    assert not outside, f"DeepSpeed imported outside {ENGINE} and {SET_UP}: {outside}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_400_lines(name):
    assert len(MODULES[name].read_text().splitlines()) <= MAX_LINES


def test_the_checks_see_the_code_they_guard():
    # The walk must find the modules and the edges it judges, or every check above passes vacuously.
    assert {"core.errors", "data_prep.shards", "launch.hosts", "lm.train", "lm.engine"} <= set(MODULES)
    assert "lm.engine" in project_imports("lm.train") and "core.errors" in project_imports("data_prep.prep")
    assert imports_deepspeed("lm.engine.engine") and imports_deepspeed(SET_UP)
    assert not imports_deepspeed("lm.train")


def test_the_exported_hugging_face_code_imports_nothing_of_ours():
    # It ships inside exported models, where `lm` is not installed.
    for name in (n for n in MODULES if n.startswith("lm.hf_twicing")):
        assert not project_imports(name), name
