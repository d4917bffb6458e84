"""Sample quality against the number of parallel decoding steps, for a trained MaskGIT (or MAGE) run:

    python launch/maskgit_steps_study.py --workdir runs/maskgit_digits --steps 1,2,4,8,16 \\
        --plot docs/studies/maskgit_steps_digits.png --json runs/maskgit_digits/steps_study.json

For each step count: the same number of samples (classes in turn), their Fréchet distance to the eval
split in the feature space of ``maskjax.quality.Classifier`` and that classifier's accuracy on their
intended class, beside the references in the same space (held-out real images, the tokenizer's
reconstructions, decoded random tokens; chance = 1 / classes). Writes a markdown table to stdout, the
JSON, a plot, and a PNG with a row of samples per step count (one per class, same seeds) beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def study(workdir: str, steps: list[int], num: int | None, temperature: float | None) -> dict:
    from maskjax import cli, evaluate

    setup, params, step, teacher = cli.restore(workdir, teacher=True)
    rows = []
    for t in steps:
        r = evaluate.evaluate_generation(setup, params, teacher, workdir, step, steps=t, num=num,
                                        temperature=temperature, png=False)
        rows.append(r)
        print(f"steps {t}: Fréchet {r['samples']['frechet_distance']:.2f}, class accuracy "
              f"{r['samples'].get('class_accuracy', float('nan')):.3f}", file=sys.stderr)
    first = rows[0]
    return {"workdir": workdir, "checkpoint_step": int(step), "objective": setup.config.objective,
            "feature_space": first["feature_space"], "classifier_test_accuracy": first["classifier_test_accuracy"],
            "choice_temperature": first["choice_temperature"],
            "references": {k: first[k] for k in ("real_train_images", "tokenizer_reconstructions", "random_tokens")},
            "classes": setup.objective.num_classes,
            "points": [{"steps": t, **r["samples"]} for t, r in zip(steps, rows)]}


def table(result: dict) -> str:
    refs = result["references"]
    lines = ["| decoding steps | Fréchet distance | class accuracy |", "|---|---|---|"]
    for p in result["points"]:
        lines.append(f"| {p['steps']} | {p['frechet_distance']:.2f} | {p.get('class_accuracy', float('nan')):.3f} |")
    names = {"real_train_images": "held-out real images", "tokenizer_reconstructions": "tokenizer reconstructions",
             "random_tokens": "random tokens"}
    for key, label in names.items():
        acc = refs[key].get("class_accuracy")
        lines.append(f"| *{label}* | {refs[key]['frechet_distance']:.2f} | {'' if acc is None else f'{acc:.3f}'} |")
    return "\n".join(lines)


def grid(workdir: str, steps: list[int], path: str) -> None:
    """A row of samples per step count: the same keys, one sample per class."""
    import numpy as np

    from maskjax import cli, evaluate, metrics

    setup, params, _, teacher = cli.restore(workdir, teacher=True)
    classes = setup.objective.num_classes or 10
    rows = [evaluate.generate(setup, params, teacher, classes, t, seed=7)[0] for t in steps]
    image = metrics.image_grid([np.asarray(r) for r in rows], setup.config.data.mean, setup.config.data.std, scale=4)
    metrics.save_png(path, image)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [p["steps"] for p in result["points"]]
    refs = result["references"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(steps, [p["frechet_distance"] for p in result["points"]], "o-", color="C0", label="samples")
    styles = {"real_train_images": ("held-out real images", "C2"),
              "tokenizer_reconstructions": ("tokenizer reconstructions", "C1"), "random_tokens": ("random tokens", "C3")}
    for key, (label, color) in styles.items():
        left.axhline(refs[key]["frechet_distance"], ls="--", color=color, label=label)
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xticks(steps, [str(s) for s in steps])
    left.set_xlabel("parallel decoding steps")
    left.set_ylabel("Fréchet distance (classifier features; lower is better)")
    left.legend(fontsize=8)
    if result["classes"]:
        right.plot(steps, [p["class_accuracy"] for p in result["points"]], "o-", color="C0", label="samples")
        right.axhline(refs["tokenizer_reconstructions"]["class_accuracy"], ls="--", color="C1",
                      label="tokenizer reconstructions")
        right.axhline(refs["real_train_images"]["class_accuracy"], ls="--", color="C2", label="held-out real images")
        right.axhline(1.0 / result["classes"], ls=":", color="grey", label="chance")
        right.set_xscale("log", base=2)
        right.set_xticks(steps, [str(s) for s in steps])
        right.set_ylim(0, 1.02)
        right.set_xlabel("parallel decoding steps")
        right.set_ylabel("classifier accuracy on the requested class")
        right.legend(fontsize=8)
    else:
        right.axis("off")
    fig.suptitle(f"{result['objective']} on {os.path.basename(result['workdir'].rstrip('/'))}: sample quality vs "
                 f"decoding steps (choice temperature {result['choice_temperature']:g})", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", default="1,2,4,8,16")
    p.add_argument("--num", type=int, default=None, help="samples per point (default generate.eval_samples)")
    p.add_argument("--temperature", type=float, default=None, help="choice temperature (default the run's)")
    p.add_argument("--plot", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    result = study(args.workdir, steps, args.num, args.temperature)
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        plot(result, args.plot)
        grid(args.workdir, steps, args.plot[:-4] + "_samples.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
