"""The shape of the package: imports point one way (no cycle, counting imports inside functions),
and the bottom layers know nothing of the layers above them."""
import ast
import os

import pytest

from tests.conftest import ROOT

PACKAGE = os.path.join(ROOT, "maskjax")


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path[:-3], ROOT).replace(os.sep, ".").removesuffix(".__init__")
                out[module] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the maskjax modules it imports anywhere in its body (functions included)."""
    modules = _modules()
    graph = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def reachable(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


@pytest.mark.parametrize("module, allowed", [
    ("maskjax.errors", set()),
    ("maskjax.config", {"maskjax.errors"}),
    ("maskjax.sharding", {"maskjax.errors"}),
    ("maskjax.masking", set()),
])
def test_bottom_layers_import_nothing_above_them(module, allowed):
    assert reachable(import_graph(), module) <= allowed


def test_objectives_and_models_never_reach_the_programs_that_run_them():
    graph = import_graph()
    programs = {"maskjax.step", "maskjax.train", "maskjax.evaluate", "maskjax.bench", "maskjax.export",
                "maskjax.cli", "maskjax.sweep", "maskjax.aot", "maskjax.params", "maskjax.checkpoint"}
    for module in graph:
        if module.startswith(("maskjax.objectives", "maskjax.models", "maskjax.data")):
            assert not reachable(graph, module) & programs, module


@pytest.mark.parametrize("name", ["mlm_text.py", "mdlm_text.py", "flip_digits.py", "mae_digits.py"])
def test_validation_prepares_and_writes_nothing(name, tmp_path):
    from maskjax import step as step_lib
    from tests.conftest import load_config

    step_lib.validate(load_config(name, data_dir=str(tmp_path / "data")), num_devices=8)
    assert not (tmp_path / "data").exists()


def test_sweep_emit_validates_with_the_commands_own_overrides(tmp_path, capsys):
    """`maskjax sweep --emit` checks every point with the command's --config overrides (here a data_dir
    nobody prepared) and prepares nothing there."""
    from maskjax import cli

    data = tmp_path / "data"
    assert cli.main(["sweep", "--sweep", os.path.join(ROOT, "configs", "sweeps", "mlm_mask_rate.py"),
                     "--workdir", str(tmp_path / "sweep"), "--emit", "local", f"--config.data.data_dir={data}"]) == 0
    assert f"--config.data.data_dir={data}" in capsys.readouterr().out
    assert not data.exists()


def test_main_called_from_python_leaves_process_wide_hooks_alone(tmp_path):
    """Only the console entry point silences thread exceptions and logging; a test or notebook that
    calls ``cli.main`` keeps its own."""
    import logging
    import sys
    import threading

    from maskjax import cli

    before = (threading.excepthook, sys.unraisablehook, logging.getLogger().level)
    assert cli.main(["params", "--config", os.path.join(ROOT, "configs", "mae_digits.py:tiny")]) == 0
    assert cli.main(["train", "--config", "no_such_file.py", "--workdir", str(tmp_path)]) == 2
    assert (threading.excepthook, sys.unraisablehook, logging.getLogger().level) == before
