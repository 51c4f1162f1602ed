"""Run directories: one of its own for every run, however many start at once, and the same one
for every process of a cluster job, across requeues.

conf/hydra/default.yaml names its run and sweep directories through the resolvers below:

- `${metalab.new_dir:<parent>,<stamp>}`: `<parent>/<stamp>`, or `<stamp>_1`, `<stamp>_2`, ...:
  the first this process creates itself (`mkdir` fails on an existing directory, also on NFS),
  so runs started in the same second never share one.
- `${metalab.run_dir:<parent>,<stamp>}`: the same, except inside a SLURM job, where it is
  `<parent>/slurm-<job>` (`slurm-<array job>_<task>`, `-step<k>` for an srun step): every task
  of the job writes there, and a requeued job finds its checkpoints again (`requeued_checkpoint`);
  under torchrun, a name its processes share (`shared_name`).

Both are resolved once per process (Hydra resolves `hydra.run.dir` more than once).
"""

import os
from itertools import count
from pathlib import Path

from omegaconf import OmegaConf

from metalab.checkpoint import read_checkpoint
from metalab.errors import StorageError

_made: dict[tuple[str, str, bool], str] = {}


def slurm_job_name() -> str | None:
    """`slurm-<job>[_<array task>][-step<k>]` inside a SLURM batch or srun job, else None.

    As Lightning's SLURMEnvironment: an interactive allocation (job name bash or interactive)
    is no job to requeue, so its runs get directories of their own.
    """
    if "SLURM_JOB_ID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return None
    if os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    name = f"slurm-{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else f"slurm-{os.environ['SLURM_JOB_ID']}"
    step = os.environ.get("SLURM_STEP_ID")
    return f"{name}-step{step}" if step and step.isdigit() else name


def shared_name(stamp: str) -> str | None:
    """The directory name every process of one launch computes alike, where a launcher starts them all.

    SLURM: the job (see slurm_job_name). torchrun: `<stamp>_torchrun-<run id>`, shared by its
    processes when they start in the same second, as before run directories were exclusive.
    Lightning's own DDP launcher passes its run directory to the processes it starts.
    """
    job = slurm_job_name()
    if job is None and "TORCHELASTIC_RUN_ID" in os.environ:
        job = f"{stamp}_torchrun-{os.environ['TORCHELASTIC_RUN_ID']}"
    return job


def slurm_restarts() -> int:
    """How often SLURM has requeued this job (0: its first start, or not a SLURM job)."""
    value = os.environ.get("SLURM_RESTART_COUNT", "0")
    return int(value) if slurm_job_name() and value.isdigit() else 0


def new_dir(parent: str, stamp: str, per_job: bool = False) -> str:
    key = (str(parent), str(stamp), per_job)
    if key not in _made:
        _made[key] = str(_make(Path(parent), str(stamp), per_job))
    return _made[key]


def _make(parent: Path, stamp: str, per_job: bool) -> Path:
    try:
        parent.mkdir(parents=True, exist_ok=True)
        job = shared_name(stamp) if per_job else None
        if job is not None:
            (parent / job).mkdir(exist_ok=True)
            return parent / job
        for n in count():
            path = parent / (stamp if n == 0 else f"{stamp}_{n}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as error:
        raise StorageError(
            f"cannot create a run directory in {parent}: {error.strerror or error}; "
            "set paths.log_dir to a writable directory"
        ) from None
    raise AssertionError("unreachable")


def requeued_checkpoint(run_dir: Path) -> Path | None:
    """In a requeued SLURM job, its newest checkpoint: last.ckpt, or the one Lightning saved on
    the requeue signal (hpc_ckpt_<n>.ckpt in the run dir) if that is of a later step."""
    if slurm_restarts() == 0:
        return None
    candidates = [run_dir / "checkpoints" / "last.ckpt", *sorted(run_dir.glob("hpc_ckpt_*.ckpt"))]
    steps = {path: read_checkpoint(path).get("global_step", -1) for path in candidates if path.is_file()}
    return max(steps, key=steps.get) if steps else None  # max keeps the first (last.ckpt) on a tie


OmegaConf.register_new_resolver("metalab.new_dir", new_dir, use_cache=True, replace=True)
OmegaConf.register_new_resolver(
    "metalab.run_dir", lambda parent, stamp: new_dir(parent, stamp, per_job=True), use_cache=True, replace=True
)
