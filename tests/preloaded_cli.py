"""metalab's commands run as their own processes, with the imports paid once per test session.

A refusal (a bad setting, a missing file) ends within a second of the command starting, but
starting `metalab-train` imports lightning first, several seconds, and the suite runs dozens of
such commands. `PreloadedCommands` starts one interpreter that imports the entry points' modules,
then forks a child for each command: the child takes the command's environment, working
directory, `sys.argv`, stdin (empty), stdout and stderr, and runs the console entry point's
`main()`, exactly as the installed script would (an uncaught exception prints its traceback and
exits 1); its exit status is the command's. Nothing one command does reaches the next.

Settings read at import time cannot change per command, so a command whose environment differs
in one of them from the session's, or a machine without `os.fork`, runs the installed script.
"""

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent
ENTRY_POINTS = {"metalab-train": "metalab.train", "metalab-eval": "metalab.eval", "metalab-predict": "metalab.predict"}
READ_AT_IMPORT = ("METALAB_CONFIG_DIR", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH")

SERVER = """
import json, os, sys, traceback
from importlib import import_module

mains = {command: import_module(module).main for command, module in json.loads(sys.argv[1]).items()}
replies = sys.stdout
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = request["argv"]
        try:
            mains[request["command"]]()
            code = 0
        except SystemExit as stop:  # as the interpreter exits: an int is the status, None 0, else printed and 1
            code = stop.code or 0
            if not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    replies.write(f"{os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}\\n")
    replies.flush()
"""


class PreloadedCommands:
    def __init__(self):
        self._server = None
        self._streams = Path(tempfile.mkdtemp(prefix="metalab-commands-"))
        self._count = 0

    def run(
        self, args: list[str], *, env: dict, cwd: Path, timeout: int = 900, text: bool = True
    ) -> subprocess.CompletedProcess:
        """`args` ([<BIN>/metalab-train or its name, *overrides]) run as subprocess.run(args,
        capture_output=True, text=text, env=env, cwd=cwd) would."""
        command = Path(args[0]).name
        if (
            command not in ENTRY_POINTS
            or not hasattr(os, "fork")
            or any(env.get(key) != os.environ.get(key) for key in READ_AT_IMPORT)
        ):
            return subprocess.run(
                [str(BIN / command), *args[1:]], capture_output=True, text=text, env=env, cwd=cwd, timeout=timeout
            )
        if self._server is None:
            self._server = subprocess.Popen(
                [sys.executable, "-c", SERVER, json.dumps(ENTRY_POINTS)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=cwd,
                start_new_session=True,  # its own process group: a command that hangs is killed with it
            )
        self._count += 1
        out, err = (self._streams / f"{self._count}.{name}" for name in ("out", "err"))
        argv = [str(BIN / command), *args[1:]]
        request = {
            "command": command,
            "argv": argv,
            "env": dict(env),
            "cwd": str(cwd),
            "stdout": str(out),
            "stderr": str(err),
        }
        self._server.stdin.write(json.dumps(request) + "\n")
        self._server.stdin.flush()
        if not select.select([self._server.stdout], [], [], timeout)[0]:
            os.killpg(self._server.pid, signal.SIGKILL)
            self._server = None
            raise subprocess.TimeoutExpired(argv, timeout)
        reply = self._server.stdout.readline()
        assert reply, f"the preloaded command server stopped (exit status {self._server.poll()})"
        read = Path.read_text if text else Path.read_bytes
        return subprocess.CompletedProcess(argv, int(reply), read(out), read(err))

    def close(self) -> None:
        if self._server is not None:
            self._server.stdin.close()
            self._server.wait(timeout=60)
            self._server = None


_commands = PreloadedCommands()
atexit.register(_commands.close)


def run_command(
    args: list[str], *, env: dict, cwd: Path, timeout: int = 900, text: bool = True
) -> subprocess.CompletedProcess:
    """`args` run as `subprocess.run(args, capture_output=True, text=text, env=env, cwd=cwd)`
    would, by the session's preloaded interpreter (PreloadedCommands)."""
    return _commands.run(args, env=env, cwd=cwd, timeout=timeout, text=text)


def metalab_command(name: str, *overrides: str, data_dir: Path, cache_dir: Path, timeout: int = 600):
    """metalab-train or metalab-eval (`name`) with `overrides`, reading the data and image cache
    from the given folders, without the progress bar, run as run_command runs it."""
    env = {**os.environ, "METALAB_DATA_DIR": str(data_dir), "METALAB_CACHE_DIR": str(cache_dir)}
    args = [str(BIN / name), "trainer.enable_progress_bar=false", *overrides]
    return run_command(args, env=env, cwd=Path.cwd(), timeout=timeout)


def trained_briefly(run_dir: Path, steps: int, *overrides: str, data_dir: Path, cache_dir: Path) -> Path:
    """metalab-train (sinusoid MAML unless `overrides` say otherwise) for `steps` outer steps into
    `run_dir`; returns its checkpoints/last.ckpt. For tests that need a genuine checkpoint to
    resume, evaluate or damage."""
    done = metalab_command(
        "metalab-train",
        f"hydra.run.dir={run_dir}",
        f"trainer.max_steps={steps}",
        *overrides,
        data_dir=data_dir,
        cache_dir=cache_dir,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return run_dir / "checkpoints" / "last.ckpt"


def resumed(run_dir: Path, checkpoint: Path, steps: int, *overrides: str, data_dir: Path, cache_dir: Path):
    """metalab-train resuming `checkpoint` into `run_dir` up to `steps` outer steps (a CompletedProcess)."""
    return metalab_command(
        "metalab-train",
        f"hydra.run.dir={run_dir}",
        f"ckpt_path={checkpoint}",
        f"trainer.max_steps={steps}",
        *overrides,
        data_dir=data_dir,
        cache_dir=cache_dir,
    )
