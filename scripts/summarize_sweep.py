"""Gather the results.json of every job of a sweep into one table, best first (Markdown and CSV).

    python scripts/summarize_sweep.py logs/train/multiruns/2026-11-26_14-21-17
    python scripts/summarize_sweep.py <sweep dir> --metric val/acc --out /tmp/table

Each job directory holds results.json (a finished run) or error.txt (a failed one) and the
overrides Hydra gave it (.hydra/overrides.yaml). The table lists the settings that differ
between jobs, the best validation score (what a search selects on, and the default sort key),
the meta-test score with its 95% CI, and the run's steps and time; failed jobs come last with
the first line of their error. Accuracy is sorted high to low, errors (mse) low to high.
Writes summary.md and summary.csv into the sweep directory (or --out) and prints the Markdown.
"""

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path

from metalab.errors import StorageError
from metalab.files import write_atomic
from metalab.results import as_dict, overrides_of, varying_overrides

LOWER_IS_BETTER = ("mse", "loss")


def load_jobs(sweep_dir: Path) -> list[dict]:
    jobs = []
    for run_dir in sorted({p.parent for name in ("results.json", "error.txt") for p in sweep_dir.rglob(name)}):
        job = {"job": str(run_dir.relative_to(sweep_dir)) or ".", "overrides": as_dict(overrides_of(run_dir))}
        if (run_dir / "results.json").is_file():
            job["results"] = json.loads((run_dir / "results.json").read_text())
        else:
            lines = (run_dir / "error.txt").read_text().strip().splitlines()
            job["error"] = lines[0] if lines else "failed"
        jobs.append(job)
    return jobs


def metric_name(jobs: list[dict]) -> str:
    keys = {k.split("/", 1)[-1] for job in jobs for k in job.get("results", {}) if k.startswith(("val/", "test/"))}
    for name in ("acc", "mse"):
        if name in keys:
            return name
    raise SystemExit("summarize_sweep: error: no val/ or test/ acc or mse in any results.json; pass --metric")


def default_metric(jobs: list[dict], name: str) -> str:
    """The validation score (what a search selects on) where the runs have one, else the meta-test score."""
    has_val = any(job.get("results", {}).get(f"val/{name}") is not None for job in jobs)
    return f"val/{name}" if has_val else f"test/{name}"


def table(jobs: list[dict], metric: str, descending: bool, name: str) -> tuple[list[str], list[list]]:
    varying = varying_overrides([job["overrides"] for job in jobs])
    columns = list(dict.fromkeys([metric, f"val/{name}", f"test/{name}", f"test/{name}_ci95"]))
    done = [j for j in jobs if "results" in j]
    failed = [j for j in jobs if "results" not in j]

    def score(job: dict) -> float:
        value = job["results"].get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return math.inf  # runs without the metric go after the others
        return -value if descending else value

    header = ["rank", "job", *varying, *columns, "global_step", "wall_time_sec", "status"]
    rows = []
    for rank, job in enumerate(sorted(done, key=score), start=1):
        res = job["results"]
        rows.append(
            [
                rank,
                job["job"],
                *(job["overrides"].get(k, "") for k in varying),
                *(res.get(c) for c in columns),
                res.get("global_step"),
                res.get("wall_time_sec"),
                "ok",
            ]
        )
    for job in failed:
        error = job["error"].removeprefix("metalab: error: ").removeprefix("metalab: job failed: ")
        rows.append(
            [
                "",
                job["job"],
                *(job["overrides"].get(k, "") for k in varying),
                *([None] * len(columns)),
                None,
                None,
                f"failed: {error}",
            ]
        )
    return header, rows


def cell(value, width: int = 100) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 3] + "..."  # the CSV keeps the whole text


def to_markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory, e.g. logs/train/multiruns/<date>")
    parser.add_argument("--metric", help="the column to sort by (default: test/acc or test/mse, else val/...)")
    parser.add_argument("--out", type=Path, help="where to write summary.md and summary.csv (default: sweep_dir)")
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--ascending", action="store_true", help="lower is better (default for mse)")
    order.add_argument("--descending", action="store_true", help="higher is better (default for acc)")
    args = parser.parse_args(argv)

    if not args.sweep_dir.is_dir():
        print(
            f"summarize_sweep: error: {args.sweep_dir} is not a directory; give a sweep's multirun directory",
            file=sys.stderr,
        )
        return 2
    jobs = load_jobs(args.sweep_dir)
    if not jobs:
        print(f"summarize_sweep: error: no results.json or error.txt under {args.sweep_dir}", file=sys.stderr)
        return 2
    name = metric_name(jobs)
    metric = args.metric or default_metric(jobs, name)
    descending = args.descending or (not args.ascending and not metric.endswith(LOWER_IS_BETTER))
    header, rows = table(jobs, metric, descending, name)

    out = args.out or args.sweep_dir
    markdown = to_markdown(header, rows)
    table_csv = io.StringIO(newline="")
    writer = csv.writer(table_csv)
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    try:  # each file whole or not at all: an earlier summary is never left half-written
        write_atomic(out / "summary.md", markdown)
        write_atomic(out / "summary.csv", table_csv.getvalue())
    except StorageError as error:
        print(f"summarize_sweep: error: {error}", file=sys.stderr)
        return 2
    print(markdown, end="")
    print(
        f"\n{len(rows)} jobs ({sum(r[-1] == 'ok' for r in rows)} finished), sorted by {metric} "
        f"({'high' if descending else 'low'} first): {out / 'summary.md'}, {out / 'summary.csv'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
