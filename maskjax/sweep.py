"""Scaling studies: a sweep file lists config overrides, every point trains in its own workdir, and the
report collects, fits and plots the points.

A sweep file is plain Python::

    CONFIG = "configs/mae_digits.py"                  # the base config (``--config`` overrides it)
    from maskjax.sweep import grid, zipped
    def get_sweep():
        return grid({"model.depth": [2, 4], "total_steps": [300, 600]})   # 4 points

``grid`` is the cartesian product of its axes, ``zipped`` pairs them up, ``product(a, b)`` combines two
lists of points, and a list of dicts can also be written out by hand. A value ``"{point:N}"`` is the
workdir of point N, which must come earlier: chained stages, e.g. dBOT's bootstrap where each stage's
frozen teacher is the previous stage's student (``{"teacher.workdir": "{point:1}"}``,
``configs/sweeps/dbot_digits.py``); points run in order, so N has finished (or failed) first.

``maskjax sweep --sweep FILE --workdir DIR`` trains the points one after another (each a ``maskjax
train`` subprocess, so a failing point is recorded and the sweep goes on) in ``DIR/points/<name>``;
``DIR/sweep.json`` indexes them with their status. Running it again skips finished points and resumes
interrupted ones from their checkpoints. ``--emit slurm|tpu|local`` prints one launch command per point
(through the ``launch/`` scripts) instead of running them. ``maskjax sweep --report DIR`` writes
``report.json``, ``report.csv`` and PNG plots; see :func:`report`.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from maskjax import storage
from maskjax.errors import MaskjaxError

INDEX = "sweep.json"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SweepError(MaskjaxError, ValueError):
    """A bad sweep file, point or sweep directory; the message names it."""


# --------------------------------------------------------------------------- sweep files


def grid(axes: dict[str, list]) -> list[dict]:
    """Every combination of the axes' values: ``grid({'a': [1, 2], 'b': [3, 4]})`` has 4 points."""
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def zipped(axes: dict[str, list]) -> list[dict]:
    """The i-th values of every axis together (all axes the same length)."""
    lengths = {k: len(v) for k, v in axes.items()}
    if len(set(lengths.values())) > 1:
        raise SweepError(f"zipped axes differ in length: {lengths}")
    keys = list(axes)
    return [dict(zip(keys, values)) for values in zip(*(axes[k] for k in keys))]


def product(*lists: list[dict]) -> list[dict]:
    """Every combination of one point from each list, merged."""
    return [{k: v for point in combo for k, v in point.items()} for combo in itertools.product(*lists)]


def point_name(index: int, overrides: dict) -> str:
    """``003-model.depth=4,total_steps=600``: sortable, readable, safe as a folder name."""
    text = ",".join(f"{k}={v}" for k, v in overrides.items())
    text = re.sub(r"[^A-Za-z0-9._=,+-]", "", text.replace(" ", ""))
    return f"{index:03d}-{text}"[:120] if text else f"{index:03d}"


def load(path: str, config: str | None = None, extra: list[str] = ()) -> tuple[str, list[dict]]:
    """(base config spec, points) of a sweep file; every point is checked against the config with the
    command's own overrides (``extra``, e.g. ``--config.data.data_dir``) first."""
    from maskjax import config as config_lib, step as step_lib

    if not os.path.isfile(path):
        raise SweepError(f"--sweep {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"maskjax_sweep_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        points = module.get_sweep() if hasattr(module, "get_sweep") else None
    except Exception as err:
        raise SweepError(f"--sweep {path!r} failed to load: {type(err).__name__}: {err}") from None
    if points is None:
        raise SweepError(f"--sweep {path!r} has no get_sweep()")
    if not isinstance(points, list) or not points or not all(isinstance(p, dict) for p in points):
        raise SweepError(f"--sweep {path!r}: get_sweep() must return a non-empty list of dicts of overrides")
    base = config or getattr(module, "CONFIG", None)
    if not base:
        raise SweepError(f"--sweep {path!r} sets no CONFIG; pass --config")
    for i, point in enumerate(points):
        for key, value in point.items():
            ref = _reference(value)
            if ref is not None and not 0 <= ref < i:
                raise SweepError(f"--sweep {path!r} point {i}: {key}={value} must name an earlier point (0..{i - 1})")
        try:
            # a workdir that does not exist yet is checked as '' (its own run validates it when it starts)
            checked = {k: ("" if _reference(v) is not None else v) for k, v in point.items()}
            c = config_lib.override(config_lib.load(base), [*extra, *_override_items(checked)])
            step_lib.validate(c)
        except config_lib.ConfigError as err:
            raise SweepError(f"--sweep {path!r} point {i} {point}: {err}") from None
    return base, points


def _override_items(point: dict) -> list[str]:
    return [f"{k}={_text(v)}" for k, v in point.items()]


_REFERENCE = re.compile(r"^\{point:(\d+)\}$")


def _reference(value) -> int | None:
    """N for a ``"{point:N}"`` value, else None."""
    match = _REFERENCE.match(value) if isinstance(value, str) else None
    return int(match.group(1)) if match else None


def resolved(point: dict, index: dict) -> dict:
    """``point``'s overrides with every ``"{point:N}"`` replaced by point N's workdir."""
    return {k: (index["points"][_reference(v)]["workdir"] if _reference(v) is not None else v)
            for k, v in point["overrides"].items()}


def _text(value) -> str:
    return repr(value) if isinstance(value, (tuple, list)) else str(value)


# --------------------------------------------------------------------------- running


def _index(workdir: str) -> dict:
    path = storage.join(workdir, INDEX)
    if not storage.exists(path):
        raise SweepError(f"{workdir!r} is not a sweep directory (no {INDEX})")
    try:
        return json.loads(storage.read_text(path))
    except ValueError as err:
        raise SweepError(f"{path}: unreadable ({err})") from None


def _write_index(workdir: str, index: dict) -> None:
    storage.write_text(storage.join(workdir, INDEX), json.dumps(index, indent=2))


def finished(point_dir: str) -> bool:
    """A point is finished when its final checkpoint exists and its final evaluation was written."""
    try:
        total = json.loads(storage.read_text(storage.join(point_dir, "config.json")))["total_steps"]
        evaluated = json.loads(storage.read_text(storage.join(point_dir, "eval.json"))).get("step")
    except (OSError, ValueError, KeyError):
        return False
    final = storage.join(point_dir, "checkpoints", str(total))
    # an object store has no rename: Orbax commits a step there with a marker file
    return evaluated == total and (storage.exists(storage.join(final, "commit_success.txt"))
                                   if storage.remote(final) else storage.isdir(final))


def plan(sweep_file: str, workdir: str, config: str | None = None, extra: list[str] = ()) -> dict:
    """Creates or updates ``workdir/sweep.json`` for the sweep and returns it."""
    from maskjax.data import sources

    base, points = load(sweep_file, config, extra)
    storage.makedirs(workdir)
    old = {}
    if storage.exists(storage.join(workdir, INDEX)):
        old = {p["name"]: p for p in _index(workdir)["points"]}
    path, sep, variant = base.partition(":")
    index = {"sweep": os.path.abspath(sweep_file), "config": base,
             "config_path": os.path.abspath(path) + sep + variant,  # for --report from any directory
             # the data_dir the points read when their config leaves it to the environment: the report
             # then finds the same tokenizer instead of preparing a corpus in the default directory
             "data_dir": sources.default_data_dir(),
             "points": []}
    varying = [k for k in dict.fromkeys(k for p in points for k in p)
               if len({repr(p.get(k)) for p in points}) > 1]  # names show what differs between points
    for i, overrides in enumerate(points):
        name = point_name(i, {k: overrides[k] for k in varying if k in overrides})
        entry = {"name": name, "overrides": overrides, "workdir": storage.join(workdir, "points", name),
                 "status": "pending"}
        entry.update({k: v for k, v in old.get(name, {}).items() if k in ("status", "returncode", "seconds")})
        index["points"].append(entry)
    _write_index(workdir, index)
    return index


def train_command(base: str, point: dict, extra: list[str], index: dict | None = None) -> list[str]:
    """``extra`` (overrides for every point) comes first, so a point's own value wins; ``index`` resolves
    references to other points' workdirs."""
    overrides = resolved(point, index) if index is not None else point["overrides"]
    return ["train", "--config", base, "--workdir", point["workdir"], *extra,
            *[f"--config.{item}" for item in _override_items(overrides)]]


def run(sweep_file: str, workdir: str, config: str | None = None, extra: list[str] = (), stream=None) -> dict:
    """Trains every unfinished point, one ``maskjax train`` process at a time; returns the index."""
    stream = stream or sys.stderr
    index = plan(sweep_file, workdir, config, extra)
    points = index["points"]
    for n, point in enumerate(points, 1):
        if finished(point["workdir"]):
            point["status"] = "done"
            stream.write(f"sweep: point {n}/{len(points)} {point['name']}: finished earlier\n")
            continue
        command = [sys.executable, "-m", "maskjax", *train_command(index["config"], point, list(extra), index)]
        stream.write(f"sweep: point {n}/{len(points)} {point['name']}: training in {point['workdir']}\n")
        stream.flush()
        started = time.monotonic()
        point["status"] = "running"
        _write_index(workdir, index)
        log = storage.join(workdir, "logs", point["name"] + ".log")
        with tempfile.TemporaryDirectory() as tmp:  # a process writes its output to a local file
            local = os.path.join(tmp, "out.log") if storage.remote(log) else log
            storage.makedirs(storage.dirname(local))
            with open(local, "a") as out:
                code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=os.getcwd()).returncode
            if local != log:
                with open(local, errors="replace") as f:
                    storage.append_text(log, f.read())
        point.update(returncode=code, seconds=round(time.monotonic() - started, 1),
                     status="done" if code == 0 and finished(point["workdir"]) else "failed")
        _write_index(workdir, index)
        tail = _last_error(log) if point["status"] == "failed" else ""
        stream.write(f"sweep: point {n}/{len(points)} {point['name']}: {point['status']} in {point['seconds']:.0f}s"
                     f"{' (exit ' + str(code) + ': ' + tail + ')' if tail else ''}\n")
        stream.flush()
    return index


def _last_error(log: str) -> str:
    lines = [line.strip() for line in storage.read_bytes(log).decode("utf-8", "replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("maskjax:")]
    return (errors or lines or ["no output"])[-1][:300]


LAUNCHERS = ("local", "multiprocess", "slurm", "tpu")


def emit(sweep_file: str, workdir: str, launcher: str, config: str | None = None, extra: list[str] = ()
         ) -> list[str]:
    """One shell command per unfinished point that trains it through a ``launch/`` script."""
    if launcher not in LAUNCHERS:
        raise SweepError(f"--emit {launcher!r}: expected one of {LAUNCHERS}")
    index = plan(sweep_file, workdir, config, extra)
    commands = []
    for point in index["points"]:
        if finished(point["workdir"]):
            continue
        args = train_command(index["config"], point, list(extra), index)
        job = re.sub(r"[^A-Za-z0-9-]", "-", point["name"])[:60]
        if launcher == "local":
            command = ["maskjax", *args]
        elif launcher == "multiprocess":
            command = ["python", "launch/local_multiprocess.py", "--processes=2", "--devices=4", "--",
                       "python", "-m", "maskjax", *args]
        elif launcher == "slurm":
            command = ["sbatch", f"--job-name={job}", "launch/slurm_gpu.sbatch", *args]
        else:  # tpu: the slice comes from the environment of whoever runs the commands
            command = ["launch/tpu_pod.sh", f"{job}", "$ZONE", "$ACCELERATOR", "--", *args]
        text = shlex.join(command)
        commands.append(text.replace("'$ZONE'", '"$ZONE"').replace("'$ACCELERATOR'", '"$ACCELERATOR"'))
    return commands


# --------------------------------------------------------------------------- collection


EMBEDDINGS = ("token_embed", "pos_embed", "patch_embed")  # input tables / projections, not the decoder's "embed"


def model_size(config) -> dict:
    """Parameters of the model a config builds (abstractly: nothing is allocated), total and without
    embeddings (token and position tables and the patch projection, as in the scaling-law literature)."""
    import jax
    from flax import nnx

    from maskjax import objectives

    objective = objectives.get(config)
    abstract = nnx.eval_shape(lambda: objective.build(nnx.Rngs(params=jax.random.key(0))))
    total = embedding = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(abstract)))[0]:
        size = int(np.prod(leaf.shape))
        total += size
        if any(str(getattr(k, "key", "")) in EMBEDDINGS for k in path):
            embedding += size
    return {"parameters": total, "non_embedding_parameters": total - embedding}


def collect(workdir: str) -> list[dict]:
    """One row per point: size, compute, data, losses, downstream metric, status."""
    from maskjax import config as config_lib, goodput, metrics, objectives

    index = _index(workdir)
    rows = []
    for point in index["points"]:
        row: dict[str, Any] = {"name": point["name"], **{f"override:{k}": v for k, v in point["overrides"].items()}}
        d = point["workdir"]
        row["status"] = "done" if finished(d) else point.get("status", "pending")
        try:
            if storage.exists(storage.join(d, "config.json")):  # what the point ran, extra overrides included
                config = objectives.saved_config(d, "sweep")
            else:
                base = index.get("config_path", index["config"])
                config = config_lib.override(config_lib.load(base), _override_items(resolved(point, index)))
        except Exception as err:  # the base config changed since the sweep ran
            row.update(status="failed", error=f"config: {err}")
            rows.append(row)
            continue
        if not config.data.data_dir and index.get("data_dir"):
            config.data.data_dir = index["data_dir"]  # where the points found their data (a tokenizer lives there)
        objective = objectives.get(config)
        row.update(model_size(config))
        per_step = int(objective.flops())
        steps = config.total_steps
        row.update(objective=config.objective, mask_ratio=objective.mask_ratio, steps=steps,
                   batch_size=config.batch_size, flops_per_step=per_step, train_flops=float(per_step) * steps,
                   examples_seen=steps * config.batch_size,
                   tokens_seen=steps * config.batch_size * objective.tokens_per_example)
        records = metrics.read_jsonl(storage.join(d, "metrics.jsonl")) if storage.exists(
            storage.join(d, "metrics.jsonl")) else []
        runs_file = storage.join(d, "runs.jsonl")
        runs = metrics.read_jsonl(runs_file) if storage.exists(runs_file) else []
        account = goodput.summarize(runs)
        if account:  # what training cost on the machine that ran it: compile, input and steps, no eval
            row["train_seconds"] = round(account["compile"] + account["data"] + account["steps"], 1)
        losses = [(r["step"], r["loss"]) for r in records if "loss" in r and np.isfinite(r["loss"])]
        row["curve"] = losses
        if losses:
            tail = [l for _, l in losses[-max(1, len(losses) // 10):]]  # the last tenth of the logs
            row.update(final_loss=float(np.mean(tail)), best_loss=float(min(l for _, l in losses)),
                       last_step=losses[-1][0])
        try:
            results = json.loads(storage.read_text(storage.join(d, "eval.json")))
            name, value = objective.summary(results)
            row.update(metric=name, metric_value=value, eval_step=results.get("step"))
            if "finetune" in results:
                row["finetune_accuracy"] = results["finetune"]["accuracy"]
            if "pretrained" in results:
                row["knn"] = results["pretrained"].get("knn")
            for group in ("raw_pixels", "random_init"):  # the baselines every claim is read against
                for name, value in results.get(group, {}).items():
                    row[f"{group}_{name}"] = value
            if "text" in results:  # the held-out loss and its context-free baseline on the same tokens
                row["validation_loss"] = results["text"].get("loss")
                row["unigram_loss"] = results["text"].get("baseline_unigram_loss")
            task = results.get("text_probe", {})
            for group in ("pretrained", "random_init", "bag_of_words"):  # downstream text task and its baselines
                for name, value in task.get(group, {}).items():
                    value = value["accuracy"] if name == "finetune" else value
                    row[f"text_{group}_{name}"] = value
            if "majority_class" in task:
                row["text_majority_class"] = task["majority_class"]
        except (OSError, ValueError):
            pass
        if "final_loss" in row:  # what the fits use: the held-out loss where the evaluation measured one
            held_out = row.get("validation_loss") is not None
            row.update(loss=row["validation_loss"] if held_out else row["final_loss"],
                       loss_source="validation" if held_out else "training")
        if row["status"] == "failed":
            log = storage.join(workdir, "logs", point["name"] + ".log")
            row["error"] = _last_error(log) if storage.exists(log) else "no log"
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- fitting


def saturating_power_law(x, a, b, c):
    return a * np.power(x, -b) + c


def fit_power_law(x, y) -> dict:
    """Fits ``y = a * x^-b + c`` (scipy's ``curve_fit``; x is rescaled by its geometric mean for
    conditioning, then a is mapped back). Returns the parameters, 95% intervals, R^2 and the points used."""
    from scipy import optimize, stats

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
    x, y = x[keep], y[keep]
    if len(x) < 4:  # three parameters: three points fit exactly and leave no error estimate
        raise SweepError(f"a power-law fit needs at least 4 finished points, got {len(x)}")
    scale = float(np.exp(np.mean(np.log(x))))
    u = x / scale
    p0 = (max(y.max() - y.min(), 1e-6), 0.5, max(y.min() * 0.9, 0.0))
    params, cov = optimize.curve_fit(saturating_power_law, u, y, p0=p0, bounds=([0, 0, 0], [np.inf, 5, np.inf]),
                                     maxfev=20000)
    a_u, b, c = params
    residual = y - saturating_power_law(u, *params)
    total = np.sum((y - y.mean()) ** 2)
    r2 = float(1 - np.sum(residual ** 2) / total) if total > 0 else float("nan")
    dof = max(len(x) - 3, 1)
    t = float(stats.t.ppf(0.975, dof))
    err = np.sqrt(np.clip(np.diag(cov), 0, np.inf)) if np.all(np.isfinite(cov)) else np.full(3, np.nan)
    a = a_u * scale ** b  # a * (x/s)^-b = (a * s^b) * x^-b
    return {"a": float(a), "b": float(b), "c": float(c),
            "b_ci95": [float(b - t * err[1]), float(b + t * err[1])],
            "c_ci95": [float(c - t * err[2]), float(c + t * err[2])],
            "r2": r2, "points": int(len(x))}


# --------------------------------------------------------------------------- report


AXES = {"compute": "train_flops", "parameters": "non_embedding_parameters", "data": "examples_seen"}


def report(workdir: str, stream=None) -> dict:
    """Collects the points, fits loss against compute, parameters and data (where they vary), writes
    ``report.json``, ``report.csv``, ``loss_vs_compute.png``, ``metric_vs_mask_ratio.png`` (when the
    mask ratio varies) and ``loss_curves.png``, and prints the fits. Failed points are listed as failed."""
    stream = stream or sys.stdout
    rows = collect(workdir)
    done = [r for r in rows if r["status"] == "done" and "loss" in r]
    fits, frontier = loss_fits(done)
    out = {"workdir": storage.absolute(workdir), "points": [{k: v for k, v in r.items() if k != "curve"} for r in rows],
           "fits": fits, "compute_optimal_frontier": [r["name"] for r in frontier],
           "failed": [r["name"] for r in rows if r["status"] == "failed"]}
    names = sorted({r["objective"] for r in done})
    if len(names) > 1 and len({r.get("mask_ratio") for r in done}) == 1:
        # objectives compared at equal compute (MDLM against AR): each fitted on its own points
        out["by_objective"] = {}
        for name in names:
            group_fits, group_frontier = loss_fits([r for r in done if r["objective"] == name])
            out["by_objective"][name] = {"fits": group_fits, "frontier": [r["name"] for r in group_frontier]}
        out["compute_multipliers"] = compute_multipliers(done, {n: g["fits"].get("compute") for n, g in
                                                                out["by_objective"].items()})
    storage.write_text(storage.join(workdir, "report.json"), json.dumps(out, indent=2, default=float))
    _write_csv(storage.join(workdir, "report.csv"), out["points"])
    out["plots"] = plots(workdir, rows, fits, frontier, out.get("by_objective"))
    stream.write(format_report(out) + "\n")
    return out


def loss_fits(done: list[dict]) -> tuple[dict, list[dict]]:
    """Power-law fits of each point's ``loss`` (the validation loss where the evaluation measured one,
    else the final training loss) against compute, parameters and data, and the compute-optimal
    frontier. Loss against compute is fitted on the frontier (the best loss each budget reached, as in
    the scaling-law papers) when it has 4 points; parameters and data on every finished point. When the
    points' losses measure different things (another objective or mask ratio: MAE's loss is over the
    hidden patches, MLM's over the masked tokens) nothing is fitted and the reason is recorded."""
    fits: dict = {}
    differs = [key for key in ("objective", "mask_ratio", "loss_source") if len({r.get(key) for r in done}) > 1]
    if differs:
        reason = (f"the loss is not comparable across points ({', '.join(differs)} varies); compare the "
                  "downstream metric instead")
        return {axis: {"x": key, "error": reason} for axis, key in AXES.items()
                if len({r[key] for r in done}) >= 4}, []
    frontier = compute_frontier(done)
    for axis, key in AXES.items():
        points = frontier if axis == "compute" and len(frontier) >= 4 else done
        if len({r[key] for r in points}) >= 4:
            try:
                fits[axis] = {"x": key, "on": "frontier" if points is frontier else "all points",
                              **fit_power_law([r[key] for r in points], [r["loss"] for r in points])}
            except (SweepError, RuntimeError, ValueError) as err:
                fits[axis] = {"x": key, "error": str(err)}
    return fits, frontier


def compute_for_loss(fit: dict, loss: float) -> float:
    """The training FLOPs at which ``fit`` (loss = a x^-b + c) reaches ``loss``; inf below its floor c."""
    if loss <= fit["c"]:
        return math.inf
    return float((fit["a"] / (loss - fit["c"])) ** (1.0 / fit["b"]))


def compute_multipliers(done: list[dict], fits: dict) -> list[dict]:
    """For every pair of objectives with a compute fit: at the loss of each finished point of the
    first, the compute the second's fit needs divided by the compute the first's fit needs (> 1: the
    second needs more). Losses outside the second's measured range are marked extrapolated."""
    out = []
    names = [n for n in sorted(fits) if fits[n] and "error" not in fits[n]]
    for first in names:
        for second in names:
            if first == second:
                continue
            measured = [r["loss"] for r in done if r["objective"] == second]
            for r in sorted((r for r in done if r["objective"] == first), key=lambda r: r["train_flops"]):
                need = compute_for_loss(fits[second], r["loss"])
                own = compute_for_loss(fits[first], r["loss"])
                out.append({"reference": first, "other": second, "point": r["name"], "loss": r["loss"],
                            "multiplier": need / own if math.isfinite(need) and own > 0 else math.inf,
                            "extrapolated": not min(measured) <= r["loss"] <= max(measured)})
    return out


def compute_frontier(rows: list[dict]) -> list[dict]:
    """The points no cheaper point beats: the lower envelope of the loss against training FLOPs."""
    best, frontier = math.inf, []
    for row in sorted(rows, key=lambda r: r["train_flops"]):
        if row["loss"] < best:
            best = row["loss"]
            frontier.append(row)
    return frontier


def _write_csv(path: str, rows: list[dict]) -> None:
    keys = sorted({k for r in rows for k in r if not isinstance(r[k], (list, dict))},
                  key=lambda k: (not k.startswith("name"), not k.startswith("override:"), k))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(path, text.getvalue())


def format_report(out: dict) -> str:
    lines = [f"{len(out['points'])} points, {len(out['failed'])} failed"
             + (f" ({', '.join(out['failed'])})" if out["failed"] else "")]
    for axis, fit in out["fits"].items():
        if "error" in fit:
            lines.append(f"loss vs {axis}: no fit ({fit['error']})")
        else:
            lines.append(f"loss vs {axis} ({fit['x']}, {fit['on']}): loss = {fit['a']:.4g} * x^-{fit['b']:.3f} + "
                         f"{fit['c']:.4f}; "
                         f"exponent 95% CI [{fit['b_ci95'][0]:.3f}, {fit['b_ci95'][1]:.3f}], R^2 {fit['r2']:.3f}, "
                         f"{fit['points']} points")
    if out["compute_optimal_frontier"]:
        lines.append("compute-optimal frontier: " + ", ".join(n.split("-", 1)[0] for n in out["compute_optimal_frontier"]))
    for name, group in out.get("by_objective", {}).items():
        fit = group["fits"].get("compute")
        if not fit:
            lines.append(f"{name}: loss vs compute: no fit (fewer than 4 points)")
        elif "error" in fit:
            lines.append(f"{name}: loss vs compute: no fit ({fit['error']})")
        else:
            lines.append(f"{name}: loss = {fit['a']:.4g} * C^-{fit['b']:.3f} + {fit['c']:.4f} ({fit['on']}, R^2 "
                         f"{fit['r2']:.3f}, exponent 95% CI [{fit['b_ci95'][0]:.3f}, {fit['b_ci95'][1]:.3f}])")
    for m in out.get("compute_multipliers", []):
        value = "never (below its fitted floor)" if not math.isfinite(m["multiplier"]) else f"{m['multiplier']:.3g}x"
        lines.append(f"at {m['reference']}'s loss {m['loss']:.4f} ({m['point'].split('-', 1)[0]}): {m['other']} needs "
                     f"{value} the compute{' (extrapolated)' if m['extrapolated'] else ''}")
    return "\n".join(lines)


def plots(workdir: str, rows: list[dict], fits: dict, frontier: list[dict], by_objective: dict | None = None
          ) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    done = [r for r in rows if r["status"] == "done" and "loss" in r]
    if done:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        x = np.array([r["train_flops"] for r in done])
        names = sorted({r["objective"] for r in done})
        for i, name in enumerate(names):
            group = [r for r in done if r["objective"] == name]
            ax.scatter([r["train_flops"] for r in group], [r["loss"] for r in group], c=f"C{i}", zorder=3,
                       label=f"{name} points" if len(names) > 1 else "points")
            fit = (by_objective or {}).get(name, {}).get("fits", {}).get("compute")
            if fit and "error" not in fit:
                grid_x = np.geomspace(x.min(), x.max(), 100)
                ax.plot(grid_x, saturating_power_law(grid_x, fit["a"], fit["b"], fit["c"]), f"C{i}", lw=1,
                        label=f"{name} fit: {fit['a']:.3g} C^-{fit['b']:.3f} + {fit['c']:.3f} (R^2 {fit['r2']:.2f})")
            unigram = [r["unigram_loss"] for r in group if r.get("unigram_loss") is not None]
            if unigram and all(r["loss_source"] == "validation" for r in group):
                ax.axhline(float(np.mean(unigram)), color=f"C{i}", linestyle=":", lw=1,
                           label=f"{name}: unigram baseline (same tokens)")
        for r in done:
            ax.annotate(r["name"].split("-", 1)[0], (r["train_flops"], r["loss"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        if frontier:
            ax.plot([r["train_flops"] for r in frontier], [r["loss"] for r in frontier], "k--", lw=1,
                    label="compute-optimal frontier")
        fit = fits.get("compute")
        if fit and "error" not in fit:
            grid_x = np.geomspace(x.min(), x.max(), 100)
            ax.plot(grid_x, saturating_power_law(grid_x, fit["a"], fit["b"], fit["c"]), "tab:red",
                    label=f"fit ({fit['on']}): {fit['a']:.3g} C^-{fit['b']:.3f} + {fit['c']:.3f} (R^2 {fit['r2']:.2f})")
        ax.set_xscale("log")
        ax.set_xlabel("training compute (FLOPs)")
        sources = {r["loss_source"] for r in done}
        ax.set_ylabel("validation loss" if sources == {"validation"} else
                      "final training loss" if sources == {"training"} else "loss (validation where measured)")
        ax.set_title("loss vs compute")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        written.append(_save(fig, workdir, "loss_vs_compute.png"))
        ratios = {r["mask_ratio"] for r in done}
        with_metric = [r for r in done if r.get("metric_value") is not None and r["mask_ratio"] is not None]
        if len(ratios) > 1 and with_metric:
            fig, ax = plt.subplots(figsize=(6.4, 4.4))
            with_metric.sort(key=lambda r: r["mask_ratio"])
            ratios = [r["mask_ratio"] for r in with_metric]
            ax.plot(ratios, [r["metric_value"] for r in with_metric], "o-", label=with_metric[0]["metric"])
            for extra in ("finetune_accuracy", "knn"):
                if all(r.get(extra) is not None for r in with_metric):
                    ax.plot(ratios, [r[extra] for r in with_metric], "s--", label=extra)
            if with_metric[0]["metric"] == "linear_probe":  # baselines: raw pixels, and k-NN at random init
                for key, color, line in (("raw_pixels_linear_probe", "C0", ":"), ("raw_pixels_knn", "C2", ":"),
                                         ("random_init_knn", "C2", "-.")):
                    values = [r[key] for r in with_metric if r.get(key) is not None]
                    if values:
                        ax.axhline(float(np.mean(values)), color=color, linestyle=line, linewidth=1,
                                   label=f"{key.replace('_', ' ')} (baseline)")
            ax.set_xlabel("mask ratio")
            ax.set_ylabel("accuracy" if with_metric[0]["metric"] != "perplexity_bound" else "perplexity bound")
            ax.set_title("downstream metric vs mask ratio")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            written.append(_save(fig, workdir, "metric_vs_mask_ratio.png"))
    task = [r for r in done if r.get("text_pretrained_linear_probe") is not None]
    if task:
        written.append(_downstream_text_plot(workdir, task))
    curves = [r for r in rows if r.get("curve")]
    if curves:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for r in curves:
            steps, losses = zip(*r["curve"])
            ax.plot(steps, losses, lw=1, label=r["name"][:40] + (" (failed)" if r["status"] == "failed" else ""))
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title("loss curves")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        written.append(_save(fig, workdir, "loss_curves.png"))
    return written


def _downstream_text_plot(workdir: str, task: list[dict]) -> str:
    """Grouped bars per point: the downstream text task's linear probe, k-NN and fine-tuned accuracy of
    the pretrained encoder and of the same encoder at random init; bag of words and the majority class
    as lines."""
    import matplotlib.pyplot as plt

    measures = [m for m in ("linear_probe", "knn", "finetune") if any(r.get(f"text_pretrained_{m}") is not None
                                                                      for r in task)]
    fig, ax = plt.subplots(figsize=(max(6.4, 1.6 * len(task) * len(measures)), 4.4))
    width = 0.8 / (2 * len(measures))
    for p, r in enumerate(task):
        for m, measure in enumerate(measures):
            for e, (encoder, hatch) in enumerate((("pretrained", ""), ("random_init", "//"))):
                value = r.get(f"text_{encoder}_{measure}")
                if value is None:
                    continue
                x = p + (2 * m + e - len(measures) + 0.5) * width
                ax.bar(x, value, width, color=f"C{m}", hatch=hatch, edgecolor="white",
                       label=f"{measure.replace('_', ' ')}, {encoder.replace('_', ' ')}" if p == 0 else None)
                ax.annotate(f"{value:.2f}", (x, value), ha="center", va="bottom", fontsize=6)
    for key, style in (("text_bag_of_words_linear_probe", "--"), ("text_majority_class", ":")):
        values = [r[key] for r in task if r.get(key) is not None]
        if values:
            ax.axhline(float(np.mean(values)), color="k", linestyle=style, lw=1,
                       label=key.removeprefix("text_").replace("_", " ") + " (baseline)")
    ax.set_xticks(range(len(task)), [f"{r['name'].split('-', 1)[0]} {r['objective']} ({r['train_flops']:.3g} FLOPs)"
                                     for r in task], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy on the eval split")
    ax.set_title("downstream text task")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    return _save(fig, workdir, "downstream_text.png")


def _save(fig, workdir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = storage.join(workdir, name)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, dpi=120, format="png")
    plt.close(fig)
    storage.write_bytes(path, image.getvalue())
    return path
