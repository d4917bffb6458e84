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
    ("maskjax.storage", {"maskjax.errors"}),
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


@pytest.mark.library_paths
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


GUIDE = os.path.join(ROOT, "docs", "adding_an_objective.md")


def guide_files(folder) -> dict[str, str]:
    """The guide's ```python blocks, each written to the file its first line names."""
    import re

    os.makedirs(folder, exist_ok=True)
    out = {}
    for block in re.findall(r"```python\n(.*?)```", open(GUIDE).read(), re.S):
        name = re.match(r"# (\w+\.py)\n", block).group(1)
        out[name] = os.path.join(folder, name)
        with open(out[name], "w") as f:
            f.write(block)
    return out


@pytest.fixture
def toy(tmp_path):
    """The guide's objective and config as files; its registration is undone afterwards, so other
    tests in this worker see the shipped objectives only."""
    import sys

    from maskjax import objectives

    files = guide_files(tmp_path / "toy")
    yield files["toy_config.py"]
    objectives.REGISTRY.pop("toy", None)
    sys.modules.pop("toy_objective", None)
    sys.path[:] = [p for p in sys.path if p != str(tmp_path / "toy")]


def test_an_objective_that_breaks_the_contract_is_refused_at_registration():
    from maskjax.objectives import base

    class NoLoss(base.Objective):
        name, data_kind = "no_loss", "image"

    with pytest.raises(TypeError, match="'no_loss' lacks validate, build, loss"):
        base.register(NoLoss)

    class Sampler(NoLoss):
        sample_kind = "text"

    with pytest.raises(TypeError, match="sample, sample_steps, tokenizer"):
        base.register(Sampler)
    assert "no_loss" not in base.REGISTRY


@pytest.mark.slow
@pytest.mark.library_paths
def test_the_guide_adds_an_objective(toy, data_dir, tmp_path, capsys):
    """docs/adding_an_objective.md's two files train, evaluate, benchmark and sweep; export and sample
    refuse the run in one line. No module of maskjax knows the objective's name."""
    import json

    from maskjax import cli, objectives

    data = f"--config.data.data_dir={data_dir}"
    run = tmp_path / "run"
    assert cli.main(["train", "--config", toy, "--workdir", str(run), data]) == 0
    results = json.loads((run / "eval.json").read_text())
    assert results["objective"] == "toy" and results["step"] == 6
    assert {"pretrained", "random_init", "raw_pixels"} <= set(results)
    assert cli.main(["eval", "--workdir", str(run), data]) == 0

    bench_json = tmp_path / "bench.json"
    assert cli.main(["bench", "--config", toy, "--steps", "2", "--warmup", "1", "--data", "synthetic",
                     "--json", str(bench_json)]) == 0
    [row] = json.loads(bench_json.read_text())["results"]
    assert row["objective"] == "toy" and row["mask_ratio"] == 0.5 and row["model_flops_per_step"] > 0

    sweep_file = tmp_path / "toy_sweep.py"
    sweep_file.write_text(f"CONFIG = {toy!r}\n\n\ndef get_sweep():\n"
                          "    return [{'mask.ratio': 0.25}, {'mask.ratio': 0.75}]\n")
    sweep_dir = tmp_path / "sweep"
    assert cli.main(["sweep", "--sweep", str(sweep_file), "--workdir", str(sweep_dir), data]) == 0
    assert cli.main(["sweep", "--report", str(sweep_dir)]) == 0
    rows = json.loads((sweep_dir / "report.json").read_text())["points"]
    assert [(r["objective"], r["mask_ratio"], r["metric"]) for r in rows] == [
        ("toy", 0.25, "linear_probe"), ("toy", 0.75, "linear_probe")]
    assert all(0.0 < r["metric_value"] <= 1.0 for r in rows)

    capsys.readouterr()
    assert cli.main(["export", "--workdir", str(run), "--out", str(tmp_path / "hf")]) == 2
    assert cli.main(["sample", "--workdir", str(run), data]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    exportable = sorted(name for name, cls in objectives.REGISTRY.items() if cls.interop.archs)
    assert "electra" in exportable and "mae" in exportable
    assert errors[-2] == "maskjax: error: a 'toy' run has no transformers equivalent to export to " \
                         f"(objectives that have one: {', '.join(exportable)})"
    assert errors[-1].startswith("maskjax: error: ") and "'toy' run, which cannot sample" in errors[-1]
    assert not (tmp_path / "hf").exists()


def test_no_objective_name_outside_objectives_and_configs():
    """Code outside ``maskjax/objectives/`` asks the objective (its declared capabilities) instead of
    comparing names: no string constant other than a docstring spells an objective's name."""
    import re

    from maskjax import objectives

    names = sorted(objectives.REGISTRY)
    quoted = re.compile("|".join(rf"['\"]{name}['\"]" for name in names))
    found = []
    for module, path in _modules().items():
        if module.startswith("maskjax.objectives"):
            continue
        tree = ast.parse(open(path).read(), path)
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if node.value in names or quoted.search(node.value):
                    found.append(f"{path}:{node.lineno}: {node.value!r}")
    assert found == []
