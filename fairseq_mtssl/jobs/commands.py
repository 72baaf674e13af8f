"""The one way the jobs run a command: recorded, logged as it runs, killed with its parent, done once.

Every command line is appended to ``{out}/commands.sh`` with the environment it adds, so a user can
repeat it at scale; its stdout and stderr stream into a log file while it runs (a killed step leaves
the log up to its last line); it runs as a child that the kernel kills when the runner dies
(:mod:`.child_process`). A finished step leaves ``{out}/done/{step}.json`` (written atomically), which
the next run takes as "skip it"; an interrupted step has no marker and simply runs again (trainings
resume from their own ``checkpoint_last.pt``).

Memory: a CPU training allocates and frees tensors of many sizes between steps (batches differ in
length), and glibc's heap keeps the freed memory, so a tiny training holds 1.4-2.3 GB of which about
0.4 GB is live. With :data:`MALLOC_TUNABLES` (blocks of 4 MB and more are mapped on their own, on
transparent huge pages, and go back to the system when freed) the same training peaks at about half
of that for about 6 % more time (``benchmarks/bench_malloc.py``). Commands get it unless the caller's
environment sets ``GLIBC_TUNABLES``; ``malloc_tunables=""`` turns it off.
"""

import json
import os
import shlex
import subprocess
import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..atomic import atomic_write
from ..errors import MtsslError
from .child_process import child_kwargs

MALLOC_TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=4194304"


class CommandFailed(MtsslError, RuntimeError):
    """A recorded command exited with a non-zero code; the message names its log."""


class DoneMarkers:
    """``{folder}/{step}.json``: a step is done when its marker exists; the marker holds its result."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, step: str) -> Path:
        return self.folder / f"{step}.json"

    def is_done(self, step: str) -> bool:
        return self.path(step).exists()

    def read(self, step: str) -> dict:
        return json.loads(self.path(step).read_text())

    def mark(self, step: str, info: Optional[dict] = None) -> None:
        with atomic_write(self.path(step)) as f:
            json.dump(info or {}, f, indent=1)


class CommandRunner:
    """Run command lines under ``out``: recorded in ``commands.sh``, logged to ``logs/<log>.log``.

    ``threads`` sets ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` of the commands; ``bin_dir`` is where a
    bare command name (``fairseq-hydra-train``, ``mtssl-abx``) is looked up first (the venv's bin).
    """

    def __init__(
        self,
        out: Path,
        threads: Optional[int] = None,
        bin_dir: Optional[Path] = None,
        malloc_tunables: str = MALLOC_TUNABLES,
    ):
        self.out = Path(out)
        self.bin = Path(bin_dir) if bin_dir else None
        self.env: Dict[str, str] = {}
        if threads:
            self.env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        if malloc_tunables and "GLIBC_TUNABLES" not in os.environ:
            self.env["GLIBC_TUNABLES"] = malloc_tunables
        self.done = DoneMarkers(self.out / "done")
        self._lock = threading.Lock()
        self._procs: List[Tuple[str, subprocess.Popen]] = []

    def log_path(self, name: str) -> Path:
        return self.out / "logs" / f"{name}.log"

    def run(self, name: str, cmd: Sequence, cwd: Optional[Path] = None) -> None:
        """Run ``cmd``, streaming its output to ``logs/{name}.log``; :class:`CommandFailed` on a non-zero exit."""
        argv = [str(c) for c in cmd]
        line = " ".join(shlex.quote(a) for a in argv)
        env_line = " ".join(f"{k}={v}" for k, v in self.env.items())
        log = self.log_path(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            with open(self.out / "commands.sh", "a", encoding="utf-8") as f:
                f.write(f"# {name}\n{env_line + ' ' if env_line else ''}{line}\n")
        exe = str(self.bin / argv[0]) if self.bin and (self.bin / argv[0]).exists() else argv[0]
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"$ {line}\n")
            f.flush()
            proc = subprocess.Popen(
                [exe, *argv[1:]],
                stdout=f,
                stderr=subprocess.STDOUT,
                cwd=cwd or self.out,
                env=dict(os.environ, **self.env),
                **child_kwargs(),
            )
            with self._lock:
                self._procs.append((name, proc))
            try:
                rc = proc.wait()
            finally:
                with self._lock:
                    self._procs.remove((name, proc))
        if rc != 0:
            tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
            raise CommandFailed(f"[{name}] `{argv[0]}` exited with {rc}; full log: {log}\n{tail}")

    def step(self, name: str, cmd: Sequence, cwd: Optional[Path] = None, say=print) -> bool:
        """:meth:`run` unless ``done/{name}.json`` exists; marks it done after. Whether it ran."""
        if self.done.is_done(name):
            say(f"[{name}] done before ({self.done.path(name)})")
            return False
        say(f"[{name}] $ {' '.join(shlex.quote(str(c)) for c in cmd)}")
        self.run(name, cmd, cwd)
        self.done.mark(name)
        return True

    def running(self) -> List[Tuple[str, int]]:
        """``(log name, pid)`` of the commands running now."""
        with self._lock:
            return [(name, p.pid) for name, p in self._procs]

    def kill_all(self) -> None:
        """Kill the running commands (their own children die with them)."""
        with self._lock:
            for _, p in self._procs:
                p.kill()


def pss_mb(pid: int) -> float:
    """Proportional set size (shared pages such as torch's libraries split among the processes that
    map them, so a sum over processes is the memory they really take); RSS where PSS is unavailable."""
    for path, key in ((f"/proc/{pid}/smaps_rollup", "Pss:"), (f"/proc/{pid}/status", "VmRSS:")):
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(key):
                        return int(line.split()[1]) / 1024.0
        except OSError:
            continue
    return 0.0


def _children(pid: int) -> List[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def tree_pss_mb(pid: int) -> float:
    """PSS of a process and all its descendants."""
    return pss_mb(pid) + sum(tree_pss_mb(c) for c in _children(pid))
