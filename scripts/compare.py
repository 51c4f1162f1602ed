"""Compare learners: our meta-test results beside the papers', and their learning curves.

    # run paper settings (any metalab-train overrides apply to every run), then compare
    python scripts/compare.py run maml_sinusoid_10shot fomaml_sinusoid_10shot --set trainer.max_steps=2000
    # or read finished runs (run dirs, or folders searched for results.json)
    python scripts/compare.py read logs/train/multiruns/2026-11-26_15-00-00

Writes a Markdown table (ours ± 95% CI beside the published figure that the experiment
config's `paper:` key records) to --out and stdout, and the learning curves (training loss
and the validation metric against the outer step, from each run's TensorBoard events)
as a PNG to --plot.
"""

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import yaml

from metalab.errors import StorageError
from metalab.files import write_atomic


def run_experiments(experiments: list[str], overrides: list[str], log_dir: Path) -> list[Path]:
    """metalab-train for each experiment, one after another; returns their run dirs."""
    run_dirs = []
    for experiment in experiments:
        experiment_dir = log_dir / experiment
        command = [sys.executable, "-m", "metalab.train", f"experiment={experiment}",
                   f"paths.log_dir={experiment_dir}", *overrides]
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
    """One table row: the setting, our figure with its CI, the paper's, and the training budget."""
    results = json.loads((run_dir / "results.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    paper = config.get("paper") or {}
    metric = paper.get("metric") or f"test/{config['dataset'].get('metric', 'acc')}"
    scale = 100.0 if metric.endswith("acc") else 1.0  # accuracy in %, as papers print it
    s = results["config"]
    setting = (f"{s['test_ways']}-way {s['test_shots']}-shot" if s["dataset"] != "sinusoid"
               else f"K={s['test_shots']}")
    ours, ci = results.get(metric), results.get(f"{metric}_ci95")
    return {
        "algorithm": s["algorithm"], "dataset": s["dataset"], "setting": setting, "metric": metric,
        "ours": None if ours is None else ours * scale, "ci95": None if ci is None else ci * scale,
        "paper": paper.get("value"), "paper_ci95": paper.get("ci95"), "source": paper.get("source", ""),
        "steps": results.get("global_step", s.get("max_steps")), "minutes": results.get("wall_time_sec", 0) / 60,
        "run_dir": run_dir,
    }


def markdown(rows: list[dict]) -> str:
    def figure(value, ci):
        if value is None:
            return "—"
        return f"{value:.2f}" + (f" ± {ci:.2f}" if ci is not None else "")

    lines = ["| algorithm | dataset | setting | metric | ours (95% CI) | paper | outer steps | minutes | paper source |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['algorithm']} | {r['dataset']} | {r['setting']} | {r['metric']} | "
                     f"{figure(r['ours'], r['ci95'])} | {figure(r['paper'], r['paper_ci95'])} | {r['steps']} | "
                     f"{r['minutes']:.1f} | {r['source']} |")
    return "\n".join(lines) + "\n"


def scalars(run_dir: Path, tag: str) -> tuple[list[int], list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps, values = [], []
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            for event in accumulator.Scalars(tag):
                steps.append(event.step)
                values.append(event.value)
    return steps, values


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        label = f"{r['algorithm']} {r['dataset']} {r['setting']}"
        steps, values = scalars(r["run_dir"], "train/loss")
        if steps:
            loss_axis.plot(steps, values, label=label, linewidth=1)
        val_tag = r["metric"].replace("test/", "val/")
        steps, values = scalars(r["run_dir"], val_tag)
        if steps:
            metric_axis.plot(steps, values, marker="o", markersize=3, label=label)
    loss_axis.set(xlabel="outer step", ylabel="training loss", title="meta-training loss", yscale="log")
    metric_axis.set(xlabel="outer step", ylabel="validation " + rows[0]["metric"].split("/")[-1] if rows else "",
                    title="meta-validation")
    for axis in (loss_axis, metric_axis):
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7)
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=120)
    plt.close(figure)
    write_atomic(path, image.getvalue())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run experiments, then compare them")
    run.add_argument("experiments", nargs="+", help="names from conf/experiment/")
    run.add_argument("--set", dest="overrides", nargs="*", default=[], help="metalab-train overrides for every run")
    run.add_argument("--log-dir", type=Path, default=Path("logs/compare"))
    read = commands.add_parser("read", help="compare finished runs")
    read.add_argument("runs", nargs="+", type=Path, help="run dirs, or folders searched for results.json")
    for sub in (run, read):
        sub.add_argument("--out", type=Path, default=Path("comparison.md"), help="Markdown table")
        sub.add_argument("--plot", type=Path, default=Path("learning_curves.png"), help="learning curves (PNG)")
    args = parser.parse_args(argv)
    run_dirs = (run_experiments(args.experiments, args.overrides, args.log_dir) if args.command == "run"
                else find_runs(args.runs))
    if not run_dirs:
        raise SystemExit("compare: no finished runs (results.json) to compare")
    rows = [describe(d) for d in run_dirs]
    table = markdown(rows)
    print(table)
    try:  # whole or not at all: an earlier table is never left half-written
        write_atomic(args.out, table)
        plot(rows, args.plot)
    except StorageError as error:
        raise SystemExit(f"compare: error: {error}") from None
    print(f"table: {args.out}\ncurves: {args.plot}")


if __name__ == "__main__":
    main()
