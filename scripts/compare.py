"""Compare learners: our meta-test results beside the papers', their learning curves, and the
paired difference of two runs on the same fixed test episodes.

    # run paper settings (any metalab-train overrides apply to every run), then compare
    python scripts/compare.py run maml_sinusoid_10shot fomaml_sinusoid_10shot --set trainer.max_steps=2000
    # or read finished runs (run dirs, or folders such as a sweep searched for results.json)
    python scripts/compare.py read logs/train/multiruns/2026-11-26_15-00-00
    # two runs on the same test episodes: mean per-episode difference (first − second), paired 95% CI
    python scripts/compare.py paired <run dir A> <run dir B> [--metric acc]

`read` and `run` write a Markdown table (ours ± 95% CI beside the published figure that the
experiment config's `paper:` key records) to --out and stdout, and the learning curves (training
loss, and every logged validation point with its 95% CI band, against the outer step, from each
run's TensorBoard or CSV logs) as a PNG to --plot; both go into the sweep's (or the runs')
directory unless told otherwise. Runs are labelled by the overrides that differ between them
(as summarize_sweep.py does); runs that differ only in `seed` are one row: the mean over the
seeds and its spread (standard deviation over seeds).
"""

import argparse
import io
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from metalab.errors import MetalabError
from metalab.files import write_atomic
from metalab.results import (
    NotPaired,
    as_dict,
    label,
    overrides_of,
    paired_difference,
    per_episode,
    scalar_series,
    varying_overrides,
)

SEED_KEYS = ("seed",)  # runs differing only in these are one setting, repeated


def run_experiments(experiments: list[str], overrides: list[str], log_dir: Path) -> list[Path]:
    """metalab-train for each experiment, one after another; returns their run dirs."""
    run_dirs = []
    for experiment in experiments:
        experiment_dir = log_dir / experiment
        command = [
            sys.executable,
            "-m",
            "metalab.train",
            f"experiment={experiment}",
            f"paths.log_dir={experiment_dir}",
            *overrides,
        ]
        print("$", " ".join(command), flush=True)
        finished = subprocess.run(command, check=False)
        found = sorted(experiment_dir.glob("**/results.json"), key=lambda p: p.stat().st_mtime)
        if finished.returncode != 0 or not found:
            print(f"compare: {experiment} failed (exit {finished.returncode}); left out", file=sys.stderr)
            continue
        run_dirs.append(found[-1].parent)
    return run_dirs


def find_runs(paths: list[Path]) -> list[Path]:
    runs = []
    for path in paths:
        if not path.exists():
            raise SystemExit(f"compare: {path} does not exist")
        runs += [path] if (path / "results.json").is_file() else sorted(p.parent for p in path.glob("**/results.json"))
    return runs


def describe(run_dir: Path) -> dict:
    """One run: the setting, our figure with its CI, the paper's, the training budget, its overrides."""
    results = json.loads((run_dir / "results.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    paper = config.get("paper") or {}
    metric = paper.get("metric") or f"test/{config['dataset'].get('metric', 'acc')}"
    if not metric.startswith("test/"):  # the paper's figure is of another evaluation (reproduce.py makes it)
        metric, paper = f"test/{config['dataset'].get('metric', 'acc')}", {}
    scale = 100.0 if metric.rsplit("/", 1)[-1].startswith("acc") else 1.0  # accuracy in %, as papers print it
    s = results["config"]
    setting = f"{s['test_ways']}-way {s['test_shots']}-shot" if s["dataset"] != "sinusoid" else f"K={s['test_shots']}"
    # A command-line override is what tells jobs apart; the seed also where it came from the config.
    overrides = {**as_dict(overrides_of(run_dir)), "seed": str(s.get("seed"))}
    ours, ci = results.get(metric), results.get(f"{metric}_ci95")
    return {
        "algorithm": s["algorithm"],
        "dataset": s["dataset"],
        "setting": setting,
        "metric": metric,
        "scale": scale,
        "ours": None if ours is None else ours * scale,
        "ci95": None if ci is None else ci * scale,
        "paper": paper.get("value"),
        "paper_ci95": paper.get("ci95"),
        "source": paper.get("source", ""),
        "steps": results.get("global_step", s.get("max_steps")),
        "minutes": results.get("wall_time_sec", 0) / 60,
        "run_dir": run_dir,
        "overrides": overrides,
    }


def group_by_seed(rows: list[dict]) -> list[dict]:
    """Runs whose settings differ only in the seed, as one group each (first-seen order), labelled
    by the overrides that vary between the groups."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        setting = {k: v for k, v in row["overrides"].items() if k not in SEED_KEYS}
        key = json.dumps([row["algorithm"], row["dataset"], row["setting"], row["metric"], setting], sort_keys=True)
        groups.setdefault(key, []).append(row)
    varying = [k for k in varying_overrides([r["overrides"] for r in rows]) if k not in SEED_KEYS]
    merged = []
    for runs in groups.values():
        first = runs[0]
        name = label(first["overrides"], varying) or f"{first['algorithm']} {first['dataset']} {first['setting']}"
        figures = [r["ours"] for r in runs if r["ours"] is not None]
        merged.append(
            {
                **first,
                "label": name,
                "runs": runs,
                "seeds": [r["overrides"].get("seed") for r in runs],
                "ours": statistics.fmean(figures) if figures else None,
                "spread": statistics.stdev(figures) if len(figures) > 1 else None,
                "ci95": first["ci95"] if len(runs) == 1 else None,
                "steps": first["steps"],
                "minutes": statistics.fmean(r["minutes"] for r in runs),
            }
        )
    return merged


def figure(value, ci) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" + (f" ± {ci:.2f}" if ci is not None and not math.isnan(ci) else "")


def markdown(groups: list[dict]) -> str:
    lines = [
        "| run | algorithm | dataset | setting | metric | ours (95% CI; or mean ± sd over seeds) | seeds | paper | "
        "outer steps | minutes | paper source |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        ours = figure(g["ours"], g["spread"] if len(g["runs"]) > 1 else g["ci95"])
        lines.append(
            f"| {g['label']} | {g['algorithm']} | {g['dataset']} | {g['setting']} | {g['metric']} | {ours} | "
            f"{','.join(map(str, g['seeds']))} | {figure(g['paper'], g['paper_ci95'])} | {g['steps']} | "
            f"{g['minutes']:.1f} | {g['source']} |"
        )
    return "\n".join(lines) + "\n"


def plot(groups: list[dict], path: Path) -> None:
    """Training loss, and one validation panel per metric (acc in %, mse): every logged point
    with its 95% CI band, the paper's figure dashed; a group's seeds share its colour."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(g["metric"] for g in groups))
    figure_, axes = plt.subplots(1, 1 + len(metrics), figsize=(5.5 * (1 + len(metrics)), 4.5), squeeze=False)
    loss_axis, metric_axes = axes[0][0], dict(zip(metrics, axes[0][1:]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for number, g in enumerate(groups):
        color, axis = colors[number % len(colors)], metric_axes[g["metric"]]
        for run in g["runs"]:
            name = short(g["label"] + (f" seed={run['overrides'].get('seed')}" if len(g["runs"]) > 1 else ""))
            steps, values = scalar_series(run["run_dir"], "train/loss")
            if steps:
                loss_axis.plot(steps, values, label=name, linewidth=1, color=color)
            val_tag = g["metric"].replace("test/", "val/")
            steps, values = scalar_series(run["run_dir"], val_tag)
            if not steps:
                continue
            values = [v * g["scale"] for v in values]
            axis.plot(steps, values, marker="o", markersize=3, label=name, color=color)
            ci_steps, cis = scalar_series(run["run_dir"], f"{val_tag}_ci95")
            ci_at = dict(zip(ci_steps, cis))
            band = [(s, v, ci_at[s] * g["scale"]) for s, v in zip(steps, values) if s in ci_at]
            if band:  # the 95% CI of each validation over its fixed episodes
                axis.fill_between(
                    [b[0] for b in band],
                    [b[1] - b[2] for b in band],
                    [b[1] + b[2] for b in band],
                    color=color,
                    alpha=0.15,
                    linewidth=0,
                )
    for metric, axis in metric_axes.items():
        for value in dict.fromkeys(g["paper"] for g in groups if g["metric"] == metric and g["paper"] is not None):
            axis.axhline(value, color="black", linestyle="--", linewidth=1, label=f"paper: {value}")
            low, high = axis.get_ylim()  # horizontal lines do not widen the axis: keep the paper's in view
            margin = 0.05 * (max(high, value) - min(low, value))
            axis.set_ylim(min(low, value - margin), max(high, value + margin))
        unit = " (%)" if metric.rsplit("/", 1)[-1].startswith("acc") else ""
        axis.set(
            xlabel="outer step",
            ylabel=f"validation {metric.split('/')[-1]}{unit}",
            title="meta-validation (band: 95% CI)",
        )
    loss_axis.set(xlabel="outer step", ylabel="training loss", title="meta-training loss", yscale="log")
    for axis in axes[0]:
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7)
    figure_.tight_layout()
    image = io.BytesIO()
    figure_.savefig(image, format="png", dpi=120)
    plt.close(figure_)
    write_atomic(path, image.getvalue())


def short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def paired(run_a: Path, run_b: Path, metric: str | None) -> str:
    """The mean per-episode difference a − b over their shared test episodes, with its paired CI."""
    for run_dir in (run_a, run_b):
        if not (run_dir / "results.json").is_file():
            raise NotPaired(f"{run_dir} is not a finished run (no results.json); give two run directories")
    a, b = per_episode(run_a), per_episode(run_b)
    if metric is None and a is not None:
        metric = "acc" if "acc" in a["values"] else "mse" if "mse" in a["values"] else sorted(a["values"])[0]
    d = paired_difference(a, b, metric or "acc", (str(run_a), str(run_b)))
    scale = 100.0 if d["metric"].startswith("acc") else 1.0
    unit = " percentage points" if scale == 100 else ""
    return (
        f"test/{d['metric']}: {d['mean_a'] * scale:.3f} − {d['mean_b'] * scale:.3f} = "
        f"{d['mean'] * scale:+.3f} ± {d['ci95'] * scale:.3f}{unit} (paired 95% CI, t with {d['episodes'] - 1} "
        f"degrees of freedom, over {d['episodes']} shared test episodes)"
    )


def default_out_dir(args: argparse.Namespace, run_dirs: list[Path]) -> Path:
    """Where the table and plot go unless told: the sweep's (or the runs' common) directory."""
    if args.command == "run":
        return args.log_dir
    if len(args.runs) == 1:
        return args.runs[0]
    return Path(os.path.commonpath([str(d.resolve()) for d in run_dirs]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run experiments, then compare them")
    run.add_argument("experiments", nargs="+", help="names from conf/experiment/")
    run.add_argument("--set", dest="overrides", nargs="*", default=[], help="metalab-train overrides for every run")
    run.add_argument("--log-dir", type=Path, default=Path("logs/compare"))
    read = commands.add_parser("read", help="compare finished runs")
    read.add_argument("runs", nargs="+", type=Path, help="run dirs, or folders searched for results.json")
    for sub in (run, read):
        sub.add_argument("--out", type=Path, help="Markdown table (default: comparison.md in the sweep's directory)")
        sub.add_argument("--plot", type=Path, help="learning curves, PNG (default: learning_curves.png beside it)")
    pair = commands.add_parser("paired", help="two runs on the same test episodes: paired difference and CI")
    pair.add_argument("run_a", type=Path)
    pair.add_argument("run_b", type=Path)
    pair.add_argument("--metric", help="per-episode metric (default: acc, else mse)")
    args = parser.parse_args(argv)

    if args.command == "paired":
        try:
            print(paired(args.run_a, args.run_b, args.metric))
        except MetalabError as error:
            print(f"compare: error: {error}", file=sys.stderr)
            return 2
        return 0
    run_dirs = (
        run_experiments(args.experiments, args.overrides, args.log_dir)
        if args.command == "run"
        else find_runs(args.runs)
    )
    if not run_dirs:
        print("compare: error: no finished runs (results.json) to compare", file=sys.stderr)
        return 2
    groups = group_by_seed([describe(d) for d in run_dirs])
    table = markdown(groups)
    out_dir = default_out_dir(args, run_dirs)
    out = args.out or out_dir / "comparison.md"
    plot_path = args.plot or out.parent / "learning_curves.png"
    print(table)
    try:  # whole or not at all: an earlier table is never left half-written
        write_atomic(out, table)
        plot(groups, plot_path)
    except MetalabError as error:
        print(f"compare: error: {error}", file=sys.stderr)
        return 2
    print(f"table: {out}\ncurves: {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
