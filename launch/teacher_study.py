"""MAE vs dBOT vs data2vec 2.0 on the embedded digits at equal training wall-clock, in one command:

    python launch/teacher_study.py --workdir runs/teacher_study --plot docs/studies/teachers_digits.png

Runs (or resumes) ``configs/sweeps/dbot_digits.py`` and ``configs/sweeps/data2vec_digits.py`` with
``maskjax sweep`` in WORKDIR/dbot and WORKDIR/data2vec, reports both, prints one markdown table (each
point's training seconds, linear probe and 20-NN accuracy beside the same encoder at random
initialisation and raw pixels, all from eval.json) and draws probe accuracy against training seconds.
Extra ``--config.KEY=VALUE`` flags go to every point.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEPS = {"dbot": "configs/sweeps/dbot_digits.py", "data2vec": "configs/sweeps/data2vec_digits.py"}
LABELS = {"dbot": ["MAE (pixels)", "dBOT stage 1 (random teacher)", "dBOT stage 2"],
          "data2vec": ["data2vec 2.0, MAE's wall-clock", "data2vec 2.0, recipe length"]}


def maskjax(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "maskjax", *args], check=True, cwd=ROOT)


def rows(workdir: str) -> list[dict]:
    out = []
    for name in SWEEPS:
        report = json.load(open(os.path.join(workdir, name, "report.json")))
        for label, point in zip(LABELS[name], report["points"]):
            out.append({"method": label, **point})
    # dBOT's cost is both stages: stage 2's row carries the sum, so the methods compare at equal cost
    dbot = [r for r in out if r["method"].startswith("dBOT")]
    if len(dbot) == 2 and all("train_seconds" in r for r in dbot):
        dbot[1]["cumulative_seconds"] = dbot[0]["train_seconds"] + dbot[1]["train_seconds"]
    return out


def table(points: list[dict]) -> str:
    lines = ["| method | steps | training s | linear probe | 20-NN | random init (linear / 20-NN) | raw pixels "
             "(linear / 20-NN) |", "|---|---|---|---|---|---|---|"]
    for r in points:
        seconds = r.get("cumulative_seconds", r.get("train_seconds", float("nan")))
        note = " (both stages)" if "cumulative_seconds" in r else ""
        get = lambda key: r.get(key, float("nan"))
        lines.append(f"| {r['method']} | {r['steps']} | {seconds:.0f}{note} | {get('metric_value'):.3f} | "
                     f"{get('knn'):.3f} | {get('random_init_linear_probe'):.3f} / {get('random_init_knn'):.3f} | "
                     f"{get('raw_pixels_linear_probe'):.3f} / {get('raw_pixels_knn'):.3f} |")
    return "\n".join(lines)


def plot(points: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, key, title in ((axes[0], "metric_value", "linear probe"), (axes[1], "knn", "20-NN")):
        for r in points:
            x = r.get("cumulative_seconds", r.get("train_seconds"))
            if x is None or r.get(key) is None:
                continue
            marker = "o" if r["method"].startswith("MAE") else "s" if r["method"].startswith("dBOT") else "^"
            dots = ax.scatter([x], [r[key]], marker=marker, s=60, label=r["method"])
            # the same encoder at random initialisation, hollow, joined to the point: the gain pretraining made
            base = r.get(f"random_init_{'linear_probe' if key == 'metric_value' else 'knn'}")
            if base is not None:
                color = dots.get_facecolor()[0]
                ax.scatter([x], [base], marker=marker, s=40, facecolors="none", edgecolors=[color])
                ax.plot([x, x], [base, r[key]], color=color, linewidth=0.8, linestyle=":")
            ax.annotate(r["method"], (x, r[key]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        raw = points[0].get(f"raw_pixels_{'linear_probe' if key == 'metric_value' else 'knn'}")
        if raw is not None:
            ax.axhline(raw, color="grey", linestyle="--", linewidth=1, label="raw pixels")
        ax.set_title(f"{title} accuracy (digits test split; hollow: random init)", fontsize=10)
        ax.set_xlabel("training seconds (compile + input + steps; dBOT: both stages)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--plot", default="")
    parser.add_argument("--report_only", action="store_true", help="only report and plot finished sweeps")
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if not a.startswith("--config.")]
    if bad:
        parser.error(f"unknown argument {bad[0]!r} (only --config.KEY=VALUE flags are passed on)")
    for name, sweep in SWEEPS.items():
        directory = os.path.join(args.workdir, name)
        if not args.report_only:
            maskjax("sweep", "--sweep", sweep, "--workdir", directory, *extra)
        maskjax("sweep", "--report", directory)
    points = rows(args.workdir)
    print(table(points))
    if args.plot:
        plot(points, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
