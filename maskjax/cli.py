"""``maskjax`` command line: train, eval, sample.

    maskjax train  --config configs/mae_digits.py[:variant] --workdir DIR [--config.KEY=VALUE ...]
    maskjax eval   --workdir DIR [--config FILE] [--config.KEY=VALUE ...]
    maskjax sample --workdir DIR [--steps K] [--num N] [--prompt TEXT | --infill TEMPLATE]
                   [--order ancestral|confidence] [--block N] [--out FILE]   (text: masked diffusion)
    maskjax sample --workdir DIR [--num N] [--class K] [--steps T] [--temperature C] [--guidance G]
                   [--trace] [--out FILE.png]                                 (images: MaskGIT, MAGE)
    maskjax params --config FILE [--mesh data=8,fsdp=4] [--devices N] [--json OUT]
    maskjax compile-check --config FILE [--mesh data=8,fsdp=4] [--devices N] [--device_memory 16GiB]
    maskjax bench  --config FILE [--steps N] [--warmup W] [--sweep mask_ratio=0,0.75] [--json OUT]
                   [--peer hf [--rounds R]]
    maskjax sweep  --sweep configs/sweeps/FILE.py --workdir DIR [--emit slurm]    |    maskjax sweep --report DIR
    maskjax data convert --name NAME --data_dir DIR [--out DIR]   (TFRecord-format TFDS dataset -> array_record)

Multi-process runs (TPU pods, SLURM, Kubernetes, launch/local_multiprocess.py): every process runs the
same command; see ``maskjax.distributed``.

Bad input (config, dataset, file, flag, checkpoint) is one line on stderr naming the offending thing and
exit status 2; ``--debug`` shows the traceback instead. Other statuses: ``maskjax.faults``.
"""
from __future__ import annotations

import argparse
import os
import sys


from maskjax.errors import MaskjaxError, UsageError


def multi_process_flags(p: argparse.ArgumentParser) -> None:
    multi = p.add_argument_group(
        "multi-process runs", "one process per host or GPU; detected on TPU VMs, SLURM and Open MPI, "
        "or given here / as JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID")
    multi.add_argument("--coordinator", default=None, help="host:port of process 0")
    multi.add_argument("--num_processes", type=int, default=None)
    multi.add_argument("--process_id", type=int, default=None)
    multi.add_argument("--distributed", default="auto", choices=("auto", "on", "off"),
                       help="auto: join a multi-process run when one is given or detected")
    multi.add_argument("--heartbeat_timeout", type=int, default=100,
                       help="seconds after which a silent process counts as dead and the run stops")
    multi.add_argument("--init_timeout", type=int, default=300,
                       help="seconds to wait for all processes to join")


def mesh_flags(p: argparse.ArgumentParser) -> None:
    """--config, --mesh and --devices of the commands that look at a config on a mesh without running it."""
    p.add_argument("--config", required=True, help="config file and optional variant: path/to/file.py[:variant]")
    p.add_argument("--mesh", default=None, help="mesh sizes, e.g. data=16,fsdp=16,tensor=1 (axes left out are 1)")
    p.add_argument("--devices", type=int, default=None,
                   help="lay the mesh over this many virtual CPU devices (to check a pod-sized mesh on one machine)")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one ``maskjax: error:`` line like every other bad input."""

    def error(self, message):
        raise UsageError(f"{message} (see: {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="maskjax", description="Masked pretraining in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p, config_required: bool, step: bool = False):
        p.add_argument("--config", required=config_required,
                       help="config file and optional variant: path/to/file.py[:variant]")
        p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, plots")
        if step:  # commands that read a checkpoint of the run
            p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        multi_process_flags(p)

    train = sub.add_parser("train", help="pretrain (resumes from the newest checkpoint in --workdir)",
                           epilog="Override any config field with --config.KEY=VALUE, e.g. --config.model.depth=12")
    common(train, True)
    train.add_argument("--no_eval", action="store_true", help="skip the final evaluation")
    train.add_argument("--stop_at", type=int, default=None,
                       help="leave after this step with a checkpoint; the schedule still spans total_steps "
                            "(e.g. the end of BERT's sequence-length-128 phase)")
    ev = sub.add_parser("eval", help="linear probe and k-NN of a run's newest checkpoint -> eval.json")
    common(ev, False, step=True)
    sample = sub.add_parser("sample", help="generate text (masked diffusion) or images (MaskGIT, MAGE) by iterative "
                                           "unmasking")
    common(sample, False, step=True)
    sample.add_argument("--steps", type=int, default=None, help="sampling steps (default: the objective's, e.g. diffusion.sample_steps)")
    sample.add_argument("--num", type=int, default=4, help="number of sequences")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", default=None, help="text: also write the samples to this file; images: the PNG grid "
                        "(default WORKDIR/samples/sample_step_S.png)")
    sample.add_argument("--class", dest="label", type=int, default=None, help="images: generate this class only "
                        "(default: classes 0, 1, ... in turn for a class-conditional model)")
    sample.add_argument("--temperature", type=float, default=None, help="images: choice temperature, the Gumbel noise "
                        "on the confidence that picks which draws stay, annealed to 0 (default generate.choice_temperature)")
    sample.add_argument("--guidance", type=float, default=None, help="images: classifier-free guidance scale "
                        "(default generate.guidance)")
    sample.add_argument("--trace", action="store_true", help="images: also write OUT_trace.png, a row per decoding "
                                                             "step (hidden patches grey)")
    sample.add_argument("--prompt", default=None, help="condition on this text: it starts every sample, the rest is generated")
    sample.add_argument("--infill", default=None, help="fill in a template: [MASK] is one generated token, [MASK:n] n of "
                        "them; every other token of the template is kept")
    sample.add_argument("--order", default="ancestral", choices=("ancestral", "confidence"),
                        help="ancestral: reveal at the schedule's rate at random positions; confidence: reveal the "
                        "most probable draws first (MaskGIT-style)")
    sample.add_argument("--block", type=int, default=0, help="semi-autoregressive: generate blocks of N positions "
                        "left to right, each in --steps steps (0: the whole sequence at once)")
    params = sub.add_parser(
        "params", help="list a config's parameters: shape, logical axes, sharding on the mesh, role, weight decay, "
                       "trainable; totals and bytes per device (nothing compiled or allocated)",
        epilog="Override any config field with --config.KEY=VALUE")
    mesh_flags(params)
    params.add_argument("--json", default=None, help="also write the rows and totals to this JSON file")
    params.add_argument("--debug", action="store_true", help="show tracebacks")
    check = sub.add_parser(
        "compile-check", help="compile the train step for a config and mesh without running it: memory and FLOPs "
                              "per device, and whether it fits (exit 4 when it does not)",
        epilog="Override any config field with --config.KEY=VALUE")
    mesh_flags(check)
    check.add_argument("--device_memory", default=None,
                       help="memory per device to check against, e.g. 16GiB (default: what the device reports)")
    check.add_argument("--json", default=None, help="also write the report to this JSON file")
    check.add_argument("--debug", action="store_true", help="show tracebacks")
    bench = sub.add_parser(
        "bench", help="time the real train step: step time, examples/s, tokens/s, data wait, FLOPs, MFU",
        epilog="Override any config field with --config.KEY=VALUE; --sweep KEY=V1,V2 (repeatable: a grid) "
               "with KEY a config key or mask_ratio, batch, depth, width")
    bench.add_argument("--config", required=True, help="config file and optional variant: path/to/file.py[:variant]")
    bench.add_argument("--steps", type=int, default=20, help="timed steps")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    bench.add_argument("--data", default=None, choices=("real", "synthetic"),
                       help="real (default): the config's dataset through the input pipeline; synthetic: random arrays")
    bench.add_argument("--sweep", action="append", default=[], help="KEY=V1,V2,...: one row per value")
    bench.add_argument("--json", default=None, help="write all results to this JSON file")
    bench.add_argument("--profile", default=None, metavar="DIR",
                       help="trace one extra step with jax.profiler into DIR and print its time per operation")
    bench.add_argument("--peer", default=None, choices=("hf",),
                       help="also time the same step in PyTorch + transformers (same weights, float32, one "
                            "synthetic batch), alternating with maskjax's, and report the ratio")
    bench.add_argument("--rounds", type=int, default=3, help="--peer: alternating rounds (the ratio is their median)")
    bench.add_argument("--debug", action="store_true", help="show tracebacks")
    multi_process_flags(bench)
    export = sub.add_parser(
        "export", help="write a run's weights for other tools: a Hugging Face transformers model directory "
                       "(--format hf) or a NumPy archive with timm / MAE-release names (--format npz)",
        epilog="Architectures: vit_mae (ViTMAEForPreTraining, MAE), vit_mim (ViTForMaskedImageModeling, SimMIM), "
               "vit (ViTModel: any image encoder, FLIP's image tower), bert (BertForMaskedLM: post-norm MLM / MDLM). "
               "Start a run from such weights with --config.init_from=PATH.")
    common(export, False, step=True)
    export.add_argument("--format", default="hf", choices=("hf", "npz"), help="hf: config.json + model.safetensors; "
                        "npz: one .npz file")
    export.add_argument("--out", required=True, help="output directory (hf) or .npz file")
    export.add_argument("--arch", default=None, help="target architecture (default: the objective's own)")
    sweep = sub.add_parser(
        "sweep", help="scaling studies: train every point of a sweep file (resumable), print launch commands "
                      "for a cluster (--emit), or collect, fit and plot a sweep (--report DIR)",
        epilog="--config.KEY=VALUE applies to every point (before the point's own overrides)")
    sweep.add_argument("--sweep", default=None, help="sweep file (configs/sweeps/*.py) with get_sweep()")
    sweep.add_argument("--workdir", default=None, help="sweep directory: sweep.json, points/, logs/")
    sweep.add_argument("--config", default=None, help="base config (default: the sweep file's CONFIG)")
    sweep.add_argument("--emit", default=None, metavar="LAUNCHER",
                       help="print one command per unfinished point instead of running: local, multiprocess, "
                            "slurm (launch/slurm_gpu.sbatch) or tpu (launch/tpu_pod.sh)")
    sweep.add_argument("--report", default=None, metavar="DIR",
                       help="collect a sweep directory: report.json, report.csv, fits and PNG plots")
    sweep.add_argument("--debug", action="store_true", help="show tracebacks")
    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    convert = data.add_parser(
        "convert", help="a TFDS dataset prepared in TFRecord format (tfds build's default) -> array_record, "
                        "which the loader reads (no TensorFlow needed)")
    convert.add_argument("--name", required=True, help="dataset name as TFDS names it: NAME[/CONFIG][:VERSION]")
    convert.add_argument("--data_dir", required=True, help="the TFDS data_dir it is prepared in (local or gs://)")
    convert.add_argument("--out", default=None, help="data_dir to write to (default: in place, beside the "
                                                     "TFRecord shards, which are kept)")
    convert.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates ``--config.KEY=VALUE`` (and ``--config.KEY VALUE``) from the other flags."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            if "=" not in arg:
                if i + 1 >= len(argv):
                    raise UsageError(f"{arg} needs a value")
                arg = f"{arg}={argv[i + 1]}"
                i += 1
            overrides.append(arg)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def load_config(spec: str | None, workdir: str, overrides: list[str]):
    from maskjax import config as config_lib

    if spec is None:
        from maskjax import objectives
        from maskjax.errors import ConfigError

        try:
            config = objectives.saved_config(workdir, "workdir")
        except ConfigError as err:
            raise UsageError(f"--workdir: {err.message}; pass --config") from None
        config.lock()
    else:
        config = config_lib.load(spec)
    return config_lib.override(config, overrides)


def _join(args) -> None:
    """Joins a multi-process run (before any other JAX call) when one is given or detected."""
    from maskjax import distributed

    distributed.initialize(distributed.options(
        args.coordinator, args.num_processes, args.process_id, args.distributed,
        args.heartbeat_timeout, args.init_timeout))


def _train(args, overrides) -> int:
    import jax

    from maskjax import train

    config = load_config(args.config, args.workdir, overrides)
    _check_workdir(args.workdir)
    if args.stop_at is not None and args.stop_at < 1:
        raise UsageError(f"--stop_at {args.stop_at} must be >= 1")
    summary = train.train(config, args.workdir, stop_at=args.stop_at, evaluate=not args.no_eval)
    losses = summary["losses"]
    if losses and jax.process_index() == 0:
        print(f"done: step {summary['end_step']}, loss {losses[0][1]:.4f} -> {losses[-1][1]:.4f}; workdir {args.workdir}")
    return 0


def _restore(args, overrides, teacher: bool = False):
    return restore(args.workdir, args.step, args.config, overrides, teacher)


def restore(workdir: str, step: int | None = None, spec: str | None = None, overrides=(), teacher: bool = False):
    """(setup, params, step) of the run in ``workdir`` at checkpoint ``step`` (default: the newest), its
    config from ``spec`` or its config.json, with ``overrides``; with ``teacher``, (setup, params, step,
    the teacher parameters the objective evaluates with, or None). Studies and scripts use this too."""
    from maskjax import checkpoint, distributed, step as step_lib

    config = load_config(spec, workdir, list(overrides))
    distributed.check_same(config)
    setup = step_lib.build(config)
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    asked, step = step, step if step is not None else ckpt.latest_step()
    if step is None or step not in ckpt.all_steps():
        raise UsageError(f"--workdir {workdir!r} has no checkpoint{'' if asked is None else f' at step {asked}'}")
    params = ckpt.restore_params(step, setup.abstract_state)
    frozen = None
    if teacher and setup.evaluates_with_teacher:
        frozen = ckpt.restore_params(step, setup.abstract_state, part="teacher")
    ckpt.close()
    return (setup, params, step, frozen) if teacher else (setup, params, step)


def _eval(args, overrides) -> int:
    import jax

    from maskjax import evaluate, metrics

    setup, params, step, teacher = _restore(args, overrides, teacher=True)
    writer = metrics.Writer(args.workdir, enabled=jax.process_index() == 0)
    results = evaluate.run(setup, params, args.workdir, step, writer, teacher=teacher)
    writer.close()
    if jax.process_index() == 0:
        print(evaluate.summary_line(results))
    return 0


def _export(args, overrides) -> int:
    import jax

    from maskjax import export, step as step_lib

    setup, params, step = _restore(args, overrides)
    host = step_lib.host_params(params)
    if jax.process_index() != 0:
        return 0
    summary = export.export(setup.config, host, args.format, args.out, args.arch, step)
    print(f"exported step {step} of {args.workdir} as {summary['class']} "
          f"({summary['tensors']} tensors, {args.format}) to {args.out}")
    return 0


def _sample(args, overrides) -> int:
    import jax

    if args.num < 1:
        raise UsageError(f"--num {args.num} must be >= 1")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps {args.steps} must be >= 1")
    setup, params, step, teacher = _restore(args, overrides, teacher=True)
    objective = setup.objective
    if objective.sample_kind is None:
        from maskjax import objectives

        can = sorted(name for name, cls in objectives.REGISTRY.items() if cls.sample_kind)
        raise UsageError(f"--workdir {args.workdir!r} is a {setup.config.objective!r} run, which cannot sample "
                         f"(objectives that can: {', '.join(can)})")
    steps = args.steps or objective.sample_steps
    if objective.sample_kind == "image":
        return _sample_images(args, setup, params, teacher, step, steps)
    if args.block < 0:
        raise UsageError(f"--block {args.block} must be >= 0")
    template = objective.template(prompt=args.prompt, infill=args.infill)

    generate = setup.jit_model_call(lambda model, key: objective.sample(model, key, args.num, steps, template,
                                                                        args.order, args.block))
    tokens = generate(params, jax.random.key(args.seed))
    pad = objective.tokenizer.pad_id
    texts = [objective.tokenizer.decode([t for t in row if t != pad]) for row in jax.device_get(tokens)]
    report = "\n\n".join(f"--- sample {i} (step {step}, {steps} denoising steps)\n{t}" for i, t in enumerate(texts))
    print(report)
    if args.out:
        from maskjax import storage

        storage.write_text(args.out, report + "\n")
    return 0


def _sample_images(args, setup, params, teacher, step: int, steps: int) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from maskjax import metrics, storage

    objective, config = setup.objective, setup.config
    classes = objective.num_classes
    if args.label is not None and not 0 <= args.label < max(classes, 1):
        raise UsageError(f"--class {args.label} is not a class of this run"
                         + (f" (0..{classes - 1})" if classes else " (it generates without classes)"))
    if args.temperature is not None and args.temperature < 0:
        raise UsageError(f"--temperature {args.temperature} must be >= 0")
    labels = None
    if classes:
        labels = np.full(args.num, args.label) if args.label is not None else np.arange(args.num) % classes
        labels = labels.astype(np.int32)

    def draw(model, key, labels, *, teacher):
        if not args.trace:
            final = objective.sample(model, key, args.num, steps, labels, args.temperature, args.guidance)
            return objective.images(final, teacher=teacher), None
        final, hidden, draws = objective.sample(model, key, args.num, steps, labels, args.temperature, args.guidance,
                                                trace=True)
        flat = lambda x: x.reshape((-1,) + x.shape[2:])  # [steps, N, L] -> [steps * N, L]: one decoder call
        pictures = objective.images(flat(draws), hidden=flat(hidden), teacher=teacher)
        return objective.images(final, teacher=teacher), pictures.reshape(draws.shape[:2] + pictures.shape[1:])

    images, trace = setup.jit_model_call(draw, teacher)(params, jax.random.key(args.seed),
                                                         None if labels is None else jnp.asarray(labels))
    images = np.asarray(images)
    out = args.out or storage.join(args.workdir, "samples", f"sample_step_{step:07d}.png")
    # rows of 10 (classes cycle 0, 1, ...: with 10 classes a column is a class); the last row padded with
    # blank (mean) images
    per_row = min(args.num, 10)
    images = np.concatenate([images, np.zeros(((-len(images)) % per_row,) + images.shape[1:], images.dtype)])
    rows = [images[i:i + per_row] for i in range(0, len(images), per_row)]
    if jax.process_index() == 0:
        metrics.save_png(out, metrics.image_grid(rows, config.data.mean, config.data.std, scale=4))
        print(f"wrote {args.num} samples ({steps} decoding steps, step {step}) to {out}")
        if args.trace:
            path = out[:-4] + "_trace.png" if out.endswith(".png") else out + "_trace.png"
            shown = np.asarray(trace)[:, :min(args.num, 16)]
            metrics.save_png(path, metrics.image_grid(list(shown), config.data.mean, config.data.std, scale=4))
            print(f"wrote the decoding trace ({steps} rows) to {path}")
    return 0


def _virtual_devices(count: int | None) -> None:
    """``--devices N``: N virtual CPU devices (read by XLA when the backend starts, not yet here)."""
    if count is None:
        return
    if count < 1:
        raise UsageError(f"--devices {count} must be >= 1")
    import re

    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


def _mesh_overrides(mesh: str | None) -> list[str]:
    """``--mesh data=8,fsdp=4`` as config overrides (axes left out are 1)."""
    if mesh is None:
        return []
    from maskjax.sharding import MESH_AXES

    sizes = {}
    for item in filter(None, mesh.split(",")):
        axis, sep, value = item.partition("=")
        if not sep or axis.strip() not in MESH_AXES:
            raise UsageError(f"--mesh {mesh!r}: expected AXIS=SIZE items with AXIS in {MESH_AXES}")
        sizes[axis.strip()] = value.strip()
    return [f"mesh.{axis}={sizes.get(axis, 1)}" for axis in MESH_AXES]


def _write_json(path: str, value) -> None:
    import json

    from maskjax import storage

    storage.write_text(path, json.dumps(value, indent=2))


def _params(args, overrides) -> int:
    _virtual_devices(args.devices)
    from maskjax import config as config_lib, params, step as step_lib

    config = config_lib.override(config_lib.load(args.config), _mesh_overrides(args.mesh) + overrides)
    result = params.table(step_lib.build(config))
    print(params.format_table(result))
    if args.json:
        _write_json(args.json, result)
    return 0


def _compile_check(args, overrides) -> int:
    _virtual_devices(args.devices)
    from maskjax import aot, config as config_lib, step as step_lib

    capacity = None
    if args.device_memory is not None:
        try:
            capacity = aot.parse_bytes(args.device_memory)
        except ValueError as err:
            raise UsageError(f"--device_memory: {err}") from None
    config = config_lib.override(config_lib.load(args.config), _mesh_overrides(args.mesh) + overrides)
    report = aot.check(step_lib.build(config), capacity)
    print(aot.format_report(report))
    if args.json:
        _write_json(args.json, report)
    return 0 if report["fits"] is not False else aot.EXIT_DOES_NOT_FIT


def _bench(args, overrides) -> int:
    import jax

    from maskjax import bench, config as config_lib

    sweeps = bench.parse_sweeps(args.sweep)
    if args.profile and os.path.exists(args.profile) and not os.path.isdir(args.profile):
        raise UsageError(f"--profile {args.profile!r} is a file, not a directory")
    config_fn = lambda: config_lib.override(config_lib.load(args.config), list(overrides))
    config_fn()  # a bad config or override fails before anything is compiled
    if args.peer:
        from maskjax import peer

        for flag, given in (("--sweep", args.sweep), ("--profile", args.profile), ("--data", args.data)):
            if given:
                raise UsageError(f"{flag} does not combine with --peer (it times one synthetic batch on both sides)")
        row = peer.compare(config_fn(), args.steps, args.warmup, args.rounds)
        print(peer.report(row))
        if args.json:
            _write_json(args.json, {"config": args.config, "overrides": list(overrides),
                                    "environment": bench.environment(), "results": [row]})
        return 0
    rows = bench.sweep(config_fn, sweeps, args.steps, args.warmup, args.data or "real", progress=True,
                       profile=args.profile)
    keys = [k for k, _ in sweeps]
    if jax.process_index() != 0:
        return 0
    print(bench.report(rows, keys))
    if args.json:
        _write_json(args.json, {"config": args.config, "overrides": list(overrides), "sweep": dict(sweeps),
                                "environment": bench.environment(), "results": rows})
    return 0


def _sweep(args, overrides) -> int:
    from maskjax import sweep

    if args.report:
        if args.sweep or args.emit:
            raise UsageError("--report DIR collects a sweep; it takes no --sweep or --emit")
        sweep.report(args.report)
        return 0
    if not args.sweep or not args.workdir:
        raise UsageError("maskjax sweep needs --sweep FILE and --workdir DIR (or --report DIR)")
    _check_workdir(args.workdir)
    extra = [f"--{item.removeprefix('--')}" for item in overrides]
    if args.emit:
        for command in sweep.emit(args.sweep, args.workdir, args.emit, args.config, extra):
            print(command)
        return 0
    index = sweep.run(args.sweep, args.workdir, args.config, extra)
    failed = [p["name"] for p in index["points"] if p["status"] != "done"]
    print(f"sweep: {len(index['points']) - len(failed)}/{len(index['points'])} points done in {args.workdir}"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f"; report: maskjax sweep --report {args.workdir}")
    return 0 if not failed else 1


def _data(args, overrides) -> int:
    if overrides:
        raise UsageError(f"maskjax data takes no --config overrides ({overrides[0]})")
    from maskjax.data import convert

    counts = convert.convert(args.name, args.data_dir, args.out)
    where = args.out or args.data_dir
    print(f"converted {args.name} to array_record in {where}: "
          + ", ".join(f"{split} {n} examples" for split, n in sorted(counts.items())))
    return 0


def _check_workdir(workdir: str) -> None:
    from maskjax import storage

    if not storage.writable(workdir):
        raise UsageError(f"--workdir {workdir!r} is not writable")


def console() -> int:
    """The ``maskjax`` command (console entry point and ``python -m maskjax``): process-wide settings
    that belong to a whole process, never to a call of :func:`main` from Python (a test, a notebook)."""
    from maskjax import hostmem

    hostmem.reexec_with_huge_pages()  # large host buffers on huge pages
    if "--debug" not in sys.argv[1:]:  # TFDS and Orbax log through absl; keep stderr to our own lines
        import logging
        import threading

        from absl import logging as absl_logging

        # A failure in a worker thread (Orbax's writer, Grain's readers) reaches the main thread, which
        # reports it in one line; the thread's own traceback and log lines are only shown with --debug.
        absl_logging.set_verbosity(absl_logging.FATAL)
        # asyncio logs "Task exception was never retrieved" with a traceback when Orbax's failed write
        # tasks are collected; the same failure is already reported as one line.
        logging.getLogger().setLevel(logging.CRITICAL)
        logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)
        threading.excepthook = lambda args: None
        sys.unraisablehook = lambda args: None
    return main(sys.argv[1:])


def main(argv: list[str] | None = None) -> int:
    """Runs one command; bad input is one line on stderr and a non-zero status (see the module doc)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        rest, overrides = _split_overrides(argv)
        args = _parser().parse_args(rest)
        if hasattr(args, "coordinator"):
            _join(args)
        commands = {"train": _train, "eval": _eval, "sample": _sample, "compile-check": _compile_check, "params": _params,
                    "bench": _bench, "sweep": _sweep, "export": _export, "data": _data}
        return commands[args.command](args, overrides)
    except KeyboardInterrupt:
        print("maskjax: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line for bad input; the traceback only with --debug
        if debug:
            raise
        from maskjax.faults import Preempted

        known = (MaskjaxError, FileNotFoundError, PermissionError)
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        # Errors that need another status say so (maskjax.faults lists them all); bad input is 2, a bug 1.
        status = getattr(err, "exit_status", 2 if isinstance(err, (known, OSError)) else 1)
        if isinstance(err, OSError) and not isinstance(err, known) and err.filename:
            message = f"{err.filename}: {err.strerror or message}"  # e.g. a full disk or a read-only folder
        elif status == 1:
            message = f"{type(err).__name__}: {message} (rerun with --debug for the traceback)"
        prefix = "maskjax: " if isinstance(err, Preempted) else "maskjax: error: "
        print(prefix + message, file=sys.stderr, flush=True)
        if getattr(err, "hard_exit", False):
            # A dead peer (JAX's shutdown barrier would wait for it) or Orbax's failed writer threads:
            # leave without the interpreter's teardown.
            sys.stdout.flush()
            os._exit(status)
        return status

if __name__ == "__main__":
    sys.exit(console())
