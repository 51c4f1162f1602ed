"""The prepared GPU check: meta-training throughput, memory, precision and the GPU path end to end.

One command measures, on the card it names, everything a session with a lent GPU needs to
report, and writes the figures to `--out` as `device_check.json` and `device_check.md`:

1. conv4 MAML (Omniglot 5-way 1-shot, meta-batch 32, second order) at 1 and 5 inner steps,
   batched against the per-task loop in alternation (scripts/bench.py), eager, with
   `algorithm.compile=true` and with `algorithm.compile=reduce-overhead` (the compiled step
   replayed as a CUDA graph), each in float32 with TF32 and in bf16 autocast;
2. first-order MAML, ANIL, Meta-SGD and MAML++ at the fastest of those settings, and
   ProtoNet's 60-way 5-shot training episodes per second;
3. peak memory of second-order, checkpointed and first-order adaptation (scripts/bench_memory.py);
4. the meta-gradient of the fastest setting against float64 eager on one real meta-batch;
5. `metalab-train experiment=maml_omniglot_5w1s hardware=gpu` with the fastest setting for
   `--train-seconds`, `metalab-eval` of its checkpoint, and a float32 eager run of the same
   steps for the accuracy effect; the run's tasks/s against the benchmark's.

Every part runs in its own process under a time limit taken from what is left of `--budget`
seconds, so one that fails or runs long is recorded and the rest still run. Run it through
scripts/device_check.sh (which installs carried wheels where hydra-core is missing):

    bash scripts/device_check.sh --out device_results            # on a GPU, about 8 minutes
    bash scripts/device_check.sh --smoke --out /tmp/smoke        # tiny settings, any CPU, ~5 minutes
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
import bench as bench_script  # noqa: E402  (the benchmark's helpers, beside this file)

PRECISION_TRAINER = {"32": "32-true", "tf32": "32-true", "bf16": "bf16-mixed"}  # --precision -> trainer.precision
COMPILE_ROW = {
    setting: code for code, setting in bench_script.COMPILE_SETTING.items()
}  # algorithm.compile -> bench row


class Check:
    """Runs the parts in order within one time budget and collects what they report."""

    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.report: dict = {
            "device": device_name(args.device),
            "torch": torch.__version__,
            "smoke": args.smoke,
            "parts": {},
        }

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.started)

    def run(self, part: str, command: list[str], limit: float | None = None) -> bool:
        """Runs `command` (logged to out/<part>.log) for at most `limit` s or what the budget leaves."""
        limit = min(limit or self.left(), self.left())
        record = self.report["parts"].setdefault(part, {})
        if limit < 5:
            record["status"] = "skipped: the time budget was spent"
            return False
        began = time.perf_counter()
        with open(self.out / f"{part}.log", "ab") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            try:
                done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=limit, check=False)
                record["status"] = "ok" if done.returncode == 0 else f"failed with exit status {done.returncode}"
            except subprocess.TimeoutExpired:
                record["status"] = f"stopped at its time limit ({limit:.0f} s)"
        record["seconds"] = round(record.get("seconds", 0) + time.perf_counter() - began, 1)
        print(f"[{time.perf_counter() - self.started:6.0f} s] {part}: {record['status']}", flush=True)
        return record["status"] == "ok"

    def save(self) -> None:
        self.report["seconds"] = round(time.perf_counter() - self.started, 1)
        (self.out / "device_check.json").write_text(json.dumps(self.report, indent=2) + "\n")
        (self.out / "device_check.md").write_text(markdown(self.report))


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def fastest(rows: list[dict], steps: int) -> dict | None:
    """The MAML row with the most batched tasks/s at `steps` inner steps."""
    candidates = [r for r in rows if r["learner"] == "maml" and r["inner_steps"] == steps]
    return max(candidates, key=lambda r: r["batched_tasks_per_sec"], default=None)


def bench(check: Check, part: str, extra: list[str]) -> list[dict]:
    a = check.args
    rows_file = check.out / f"{part}.jsonl"
    check.run(
        part,
        [
            sys.executable,
            str(SCRIPTS / "bench.py"),
            "--device",
            a.device,
            "--seconds",
            str(a.seconds),
            "--meta-batch",
            str(a.meta_batch),
            "--json",
            str(rows_file),
            *extra,
        ],
    )
    rows = read_rows(rows_file)
    check.report["parts"][part]["rows"] = list(rows)
    return rows


def gradient_accuracy(args) -> dict:
    """Relative difference of the meta-gradient of (compile, precision) against float64 eager, per parameter."""
    device = torch.device(args.device)
    # conv4 on real Omniglot; the smoke run takes the MLP (conv4 compiles for minutes on a small CPU).
    bench_model = bench_script.MODELS["mlp" if args.smoke else "conv4"]
    backbone, shape = bench_model.backbone, bench_model.input_shape
    batch = (
        bench_script.random_batch(shape[0], args.meta_batch)
        if args.smoke
        else bench_script.omniglot_batch(meta_batch=args.meta_batch)
    )
    result = {}
    for steps in args.steps:
        grads = {}
        for label, compiled, precision, dtype in (
            ("float64 eager", False, "32", torch.float64),
            ("fast", args.compile, args.precision, torch.float32),
        ):
            model = bench_script.learner("maml", backbone, shape, steps, 0.4, compiled).to(device, dtype)
            episode = type(batch)(
                batch.support_x.to(device, dtype),
                batch.support_y.to(device),
                batch.query_x.to(device, dtype),
                batch.query_y.to(device),
            )
            with bench_script.precision_context(precision, device):
                loss = (model.compiled_meta_loss(episode) if model.compiled else model.meta_loss(episode))[0]
            loss.backward()
            grads[label] = {n: p.grad.detach().double().cpu() for n, p in model.named_parameters()}
        reference = grads["float64 eager"]
        overall = torch.cat([g.flatten() for g in reference.values()]).norm()
        difference = torch.cat([(grads["fast"][n] - g).flatten() for n, g in reference.items()]).norm()
        # A parameter whose true gradient is ~0 (a convolution's bias just before BatchNorm,
        # which the normalization cancels) has no meaningful relative error: left out.
        relative = {
            n: float((grads["fast"][n] - g).norm() / g.norm())
            for n, g in reference.items()
            if g.norm() > 1e-6 * overall
        }
        ordered = sorted(relative.values())
        result[f"{steps} inner steps"] = {
            "whole_gradient": float(difference / overall),
            "max": ordered[-1],
            "median": ordered[len(ordered) // 2],
            "per_parameter": relative,
            "left_out_zero_gradient": sorted(set(reference) - set(relative)),
        }
    return {"compile": args.compile, "precision": args.precision, **result}


def train_and_eval(check: Check, part: str, setting: dict, seconds: float | None, max_steps: int | None) -> dict:
    """metalab-train of the MAML paper setting with `setting`, then metalab-eval of its checkpoint."""
    a = check.args
    run_dir = check.out / "runs" / part
    hardware = (
        ["hardware=gpu", f"tf32={str(setting['precision'] != '32').lower()}"]
        if a.device.startswith("cuda")
        else ["hardware=cpu"]
    )
    overrides = [
        f"experiment={a.experiment}",
        *hardware,
        f"trainer.precision={PRECISION_TRAINER[setting['precision']]}",
        f"algorithm.compile={str(setting['compile']).lower()}",
        f"hydra.run.dir={run_dir}",
        f"trainer.val_check_interval={a.val_interval}",
        f"val_episodes={a.val_episodes}",
        f"test_episodes={a.test_episodes}",
        f"meta_batch_size={a.meta_batch}",
        f"trainer.max_steps={max_steps or 10**6}",
    ]
    if seconds is not None:
        overrides.append(f"+trainer.max_time={{seconds: {int(seconds)}}}")
    ok = check.run(part, [sys.executable, "-m", "metalab.train", *overrides], limit=(seconds or check.left()) + 240)
    results = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").exists() else {}
    record = check.report["parts"][part]
    record.update(
        setting=setting,
        train={k: results.get(k) for k in ("test/acc", "test/acc_ci95", "train_tasks_per_sec", "wall_time_sec")},
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    if ok and last.exists():
        record["steps"] = int(torch.load(last, map_location="cpu", weights_only=True)["global_step"])
        eval_dir = check.out / "runs" / f"{part}-eval"
        if check.run(
            f"{part}-eval",
            [
                sys.executable,
                "-m",
                "metalab.eval",
                f"ckpt_path={last}",
                f"hydra.run.dir={eval_dir}",
                f"test_episodes={a.test_episodes}",
                *hardware[:1],
            ],
            limit=240,
        ):
            evaluated = json.loads((eval_dir / "results.json").read_text())
            record["eval"] = {k: evaluated.get(k) for k in ("test/acc", "test/acc_ci95", "test_tasks_per_sec")}
    return record


def markdown(report: dict) -> str:
    lines = [
        f"# Device check: {report['device']}, torch {report['torch']}"
        + (" (smoke settings)" if report["smoke"] else ""),
        "",
    ]
    for part, record in report["parts"].items():
        lines.append(f"## {part}: {record.get('status')} ({record.get('seconds', 0)} s)")
        rows = record.get("rows", [])
        if rows and "ratio" in rows[0]:
            lines += [
                "",
                "| learner | compile | precision | inner steps | loop tasks/s | batched tasks/s | ratio |",
                "|---|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {r['learner']} | {r['compile']} | {r['precision']} | {r['inner_steps']} | "
                f"{r['loop_tasks_per_sec']:.1f} | {r['batched_tasks_per_sec']:.1f} | {r['ratio']:.1f}x |"
                for r in rows
                if "ratio" in r
            ]
        lines += [
            f"- {r['learner']}, {r['model']}, {r['precision']}: {r['episodes_per_sec']:.2f} episodes/s"
            for r in rows
            if "episodes_per_sec" in r
        ]
        for key in ("memory", "gradient", "setting", "steps", "train", "eval", "pipeline"):
            if key in record:
                lines.append(f"- {key}: `{json.dumps(record[key])}`")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="device_results", help="folder for device_check.{json,md} and the logs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny settings, to test this script on a CPU")
    parser.add_argument("--budget", type=float, default=None, help="seconds for everything (default 450; smoke 600)")
    parser.add_argument("--train-seconds", type=float, default=None, help="end-to-end training time (default 120)")
    parser.add_argument("--grad-check", action="store_true", help=argparse.SUPPRESS)  # internal, with the next two
    parser.add_argument("--compile", default="false", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.compile = {"false": False, "true": True}.get(args.compile, args.compile)
    smoke = args.smoke
    args.budget = args.budget or (600 if smoke else 450)
    args.train_seconds = args.train_seconds or (15 if smoke else 120)
    args.seconds, args.meta_batch = (0.3, 4) if smoke else (2.0, 32)
    args.steps = [1] if smoke else [1, 5]
    args.experiment = "maml_omniglot_5w1s"
    args.val_interval, args.val_episodes, args.test_episodes = (5, 4, 20) if smoke else (500, 100, 600)
    if args.grad_check:
        print(json.dumps(gradient_accuracy(args)))
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(
            f"--device {args.device}: no CUDA GPU is visible to torch {torch.__version__}; use --smoke on a CPU"
        )

    check = Check(args)
    try:
        run_parts(check)
    finally:
        check.save()
        print(f"figures: {check.out / 'device_check.md'}", flush=True)


def run_parts(check: Check) -> None:
    a = check.args
    on_gpu = a.device.startswith("cuda")
    steps = [str(s) for s in a.steps]
    # 1. conv4 MAML (the smoke run times the MLP: conv4 compiles for minutes on a small CPU).
    model = ["--models", "mlp"] if a.smoke else ["--models", "conv4"]
    precisions = ["32", "bf16"] if a.smoke else ["tf32", "bf16"]
    rows = bench(
        check,
        "1-maml-eager",
        [*model, "--learners", "maml", "--compile", "no", "--steps", *steps, "--precision", *precisions, "--metric"],
    )
    rows += bench(
        check,
        "1-maml-compiled",
        [
            *model,
            "--learners",
            "maml",
            "--compile",
            "only",
            "--steps",
            *steps,
            "--precision",
            *precisions,
            *(["--cudagraphs"] if on_gpu else []),
            "--metric",  # none: they are timed once, in part 2
        ],
    )
    best = fastest(rows, a.steps[-1]) or {"compile": False, "precision": precisions[0]}
    setting = {"compile": best["compile"], "precision": best["precision"]}
    check.report["fastest_setting"] = setting
    # 2. The rest of the family at that setting (ANIL cannot compile: eager), and ProtoNet's episodes.
    compile_mode = COMPILE_ROW[setting["compile"]]
    family = ["fomaml", "metasgd", "mamlpp"]
    bench(
        check,
        "2-family",
        [
            *model,
            "--learners",
            *family,
            "--compile",
            "no" if compile_mode == "0" else "only",
            "--steps",
            *steps,
            "--precision",
            setting["precision"],
            *(["--cudagraphs"] if compile_mode == "ro" else []),
            "--metric",
        ],
    )
    bench(
        check,
        "2-anil-protonet",
        [
            *model,
            "--learners",
            "anil",
            "--compile",
            "no",
            "--steps",
            *steps,
            "--precision",
            setting["precision"],
            "--metric",
            "protonet",
        ],
    )
    # 3. Memory of second-order, checkpointed and first-order adaptation.
    memory_file = check.out / "memory.json"
    memory = ["--meta-batch", "2", "--steps", "1"] if a.smoke else []
    check.run(
        "3-memory",
        [sys.executable, str(SCRIPTS / "bench_memory.py"), "--device", a.device, *memory, "--json", str(memory_file)],
    )
    if memory_file.exists():
        check.report["parts"]["3-memory"]["memory"] = json.loads(memory_file.read_text())
    # 4. The fastest setting's meta-gradient against float64 eager.
    gradient_file = check.out / "gradient.json"
    with open(gradient_file, "w") as out:
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--grad-check",
                "--device",
                a.device,
                "--compile",
                str(setting["compile"]).lower(),
                "--precision",
                setting["precision"],
                *(["--smoke"] if a.smoke else []),
            ],
            stdout=out,
            check=False,
            timeout=max(check.left(), 1),
        )
    lines = gradient_file.read_text().splitlines()
    check.report["parts"]["4-gradient"] = {
        "status": "ok" if lines else "failed",
        "gradient": json.loads(lines[-1]) if lines else None,
    }
    # 5. End to end: the fastest setting for --train-seconds, then float32 eager for the same steps.
    fast = train_and_eval(check, "5-train-fast", setting, a.train_seconds, None)
    bench_rate = next(
        (
            r["batched_tasks_per_sec"]
            for r in rows
            if r["compile"] == setting["compile"] and r["precision"] == setting["precision"] and r["inner_steps"] == 1
        ),
        None,
    )
    trained_rate = (fast.get("train") or {}).get("train_tasks_per_sec")
    if bench_rate and trained_rate:
        fast["pipeline"] = {
            "bench_tasks_per_sec": bench_rate,
            "train_tasks_per_sec": trained_rate,
            "train_over_bench": trained_rate / bench_rate,
        }
    if fast.get("steps"):
        train_and_eval(check, "5-train-float32-eager", {"compile": False, "precision": "32"}, None, fast["steps"])


if __name__ == "__main__":
    main()
