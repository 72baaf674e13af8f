"""A small resumable stage runner: named stages with dependencies, run up to ``jobs`` at a time.

Each stage is a Python callable that runs console scripts through :meth:`Pipeline.run`. Every
command line is appended to ``{out}/commands.sh`` (so a user can repeat the stage at scale), its
output goes to ``{out}/logs/{stage}.log``, and a finished stage leaves ``{out}/stages/{stage}.json``
(written atomically) so the next run skips it. An interrupted stage is simply run again: its
commands resume from their own checkpoints (``fairseq-hydra-train`` from ``checkpoint_last.pt``).

The console shows one line when a stage starts or ends and, every ``heartbeat`` seconds, what is
running (with the latest ``num_updates`` of a training stage). Commands die with the runner
(:mod:`fairseq_mtssl.child_process`), so a ``kill -9`` leaves no orphan writing into the run folder.
Concurrent stages each get
``threads`` intra-op threads (``OMP_NUM_THREADS``), and a sampler records the peak memory (PSS) of
all child processes together, and of each stage.

Memory: a CPU training allocates and frees tensors of many sizes between steps (batches differ in
length), and glibc's heap keeps the freed memory, so a tiny training holds 1.4-2.3 GB of which
about 0.4 GB is live. With :data:`MALLOC_TUNABLES` (blocks of 4 MB and more are mapped on their own,
on transparent huge pages, and go back to the system when freed) the same training peaks at about
half of that for about 6 % more time (``benchmarks/bench_malloc.py``). Commands get it unless
the caller's environment sets ``GLIBC_TUNABLES``; ``malloc_tunables=""`` turns it off.
"""

import json
import os
import re
import shlex
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .atomic import atomic_write
from .child_process import child_kwargs

_UPDATES = re.compile(r"num_updates=(\d+)")
MALLOC_TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=4194304"


class StageFailed(RuntimeError):
    pass


@dataclass
class StageSpec:
    name: str
    fn: Callable[[], Optional[dict]]
    after: Sequence[str] = ()
    progress: Optional[Callable[[], str]] = None  # a short "what it is doing" for the heartbeat
    info: dict = field(default_factory=dict)


class Pipeline:
    def __init__(
        self,
        out: Path,
        jobs: int = 1,
        threads: int = 1,
        force: bool = False,
        heartbeat: float = 30.0,
        bin_dir: Optional[Path] = None,
        malloc_tunables: str = MALLOC_TUNABLES,
    ):
        self.out, self.jobs, self.threads, self.force, self.heartbeat = (
            Path(out),
            max(1, jobs),
            max(1, threads),
            force,
            heartbeat,
        )
        self.bin = Path(bin_dir) if bin_dir else None
        self.env = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        if malloc_tunables and "GLIBC_TUNABLES" not in os.environ:
            self.env["GLIBC_TUNABLES"] = malloc_tunables
        self.specs: Dict[str, StageSpec] = {}
        self.results: Dict[str, dict] = {}
        self._lock = threading.Lock()
        self._running: Dict[str, float] = {}
        self._procs: List[Tuple[str, subprocess.Popen]] = []
        self.peak_breakdown_mb: Dict[str, float] = {}  # what each running stage held at the peak
        self.stage_peak_mb: Dict[str, float] = {}  # each stage's own peak
        self.t0 = time.time()

    # -- declaring ------------------------------------------------------------------------------
    def add(self, name: str, fn, after: Sequence[str] = (), progress=None) -> None:
        missing = [d for d in after if d not in self.specs]
        if missing:
            raise ValueError(f"stage {name!r} depends on undeclared stages {missing}")
        self.specs[name] = StageSpec(name, fn, tuple(after), progress)

    def marker(self, name: str) -> Path:
        return self.out / "stages" / f"{name}.json"

    # -- running commands -----------------------------------------------------------------------
    def run(self, stage: str, cmd: Sequence, cwd: Optional[Path] = None) -> None:
        """Run one console script (looked up in ``bin_dir``), recording the command line."""
        argv = [str(c) for c in cmd]
        line = " ".join(shlex.quote(a) for a in argv)
        with self._lock:
            with open(self.out / "commands.sh", "a", encoding="utf-8") as f:
                env = " ".join(f"{k}={v}" for k, v in self.env.items())
                f.write(f"# stage {stage}\n{env} {line}\n")
        exe = str(self.bin / argv[0]) if self.bin and (self.bin / argv[0]).exists() else argv[0]
        env = dict(os.environ, **self.env)
        log = self.out / "logs" / f"{stage}.log"
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"$ {line}\n")
            f.flush()
            proc = subprocess.Popen(
                [exe, *argv[1:]], stdout=f, stderr=subprocess.STDOUT, cwd=cwd or self.out, env=env, **child_kwargs()
            )
            with self._lock:
                self._procs.append((stage, proc))
            rc = proc.wait()
            with self._lock:
                self._procs.remove((stage, proc))
        if rc != 0:
            tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
            raise StageFailed(f"[{stage}] `{argv[0]}` exited with {rc}; full log: {log}\n{tail}")

    # -- scheduling -----------------------------------------------------------------------------
    def _say(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{time.time() - self.t0:6.0f}s] {msg}", flush=True)

    def _run_stage(self, spec: StageSpec, errors: List[BaseException]) -> None:
        start = time.time()
        try:
            info = spec.fn() or {}
            info["seconds"] = round(time.time() - start, 1)
            with atomic_write(self.marker(spec.name)) as f:
                json.dump(info, f, indent=1)
            self.results[spec.name] = info
            self._say(f"done     {spec.name} ({info['seconds']:.0f} s)")
        except BaseException as e:  # noqa: BLE001 - reported by execute()
            errors.append(e)
            self._say(f"FAILED   {spec.name}: {str(e).splitlines()[0]}")
        finally:
            with self._lock:
                self._running.pop(spec.name, None)

    def _sample_memory(self, stop: threading.Event) -> None:
        while not stop.wait(0.5):
            with self._lock:
                pids = [(stage, p.pid) for stage, p in self._procs]
            by_stage = {"runner": pss_mb(os.getpid())}
            for stage, pid in pids:
                by_stage[stage] = by_stage.get(stage, 0.0) + _tree_pss_mb(pid)
            for stage, mb in by_stage.items():
                self.stage_peak_mb[stage] = max(self.stage_peak_mb.get(stage, 0.0), mb)
            if sum(by_stage.values()) > self.peak_pss_mb:
                self.peak_breakdown_mb = by_stage

    @property
    def peak_pss_mb(self) -> float:
        """The highest sampled total (runner and every running command)."""
        return sum(self.peak_breakdown_mb.values())

    def execute(self) -> Dict[str, dict]:
        (self.out / "stages").mkdir(parents=True, exist_ok=True)
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        pending = list(self.specs)  # declaration order is the priority order
        done = set()
        for name in list(pending):
            if self.marker(name).exists() and not self.force:
                self.results[name] = json.loads(self.marker(name).read_text())
                done.add(name)
                pending.remove(name)
                self._say(f"skipped  {name} (finished earlier: {self.marker(name)})")
        errors: List[BaseException] = []
        threads: Dict[str, threading.Thread] = {}
        stop = threading.Event()
        sampler = threading.Thread(target=self._sample_memory, args=(stop,), daemon=True)
        sampler.start()
        last_beat = time.time()
        try:
            while pending or threads:
                for name, t in list(threads.items()):
                    if not t.is_alive():
                        threads.pop(name)
                        if name in self.results:
                            done.add(name)
                if errors:
                    if not threads:
                        raise errors[0]
                else:
                    for name in list(pending):
                        if len(threads) >= self.jobs:
                            break
                        spec = self.specs[name]
                        if all(d in done for d in spec.after):
                            pending.remove(name)
                            with self._lock:
                                self._running[name] = time.time()
                            self._say(f"start    {name}  ({len(done) + len(threads) + 1}/{len(self.specs)})")
                            t = threading.Thread(target=self._run_stage, args=(spec, errors), daemon=True)
                            threads[name] = t
                            t.start()
                    if pending and not threads:
                        raise StageFailed(f"stages {pending} wait on stages that did not finish")
                if time.time() - last_beat >= self.heartbeat and threads:
                    last_beat = time.time()
                    self._say("running  " + "; ".join(self._describe(n) for n in threads))
                time.sleep(0.2)
        except BaseException:
            with self._lock:  # their own children die with them (child_process)
                for _, p in self._procs:
                    p.kill()
            raise
        finally:
            stop.set()
        return self.results

    def _describe(self, name: str) -> str:
        spec = self.specs[name]
        with self._lock:
            elapsed = time.time() - self._running.get(name, time.time())
        extra = ""
        if spec.progress is not None:
            try:
                extra = spec.progress() or ""
            except OSError:
                extra = ""
        return f"{name} {elapsed:.0f} s{', ' + extra if extra else ''}"


def latest_updates(log: Path) -> Optional[int]:
    """The last ``num_updates=`` a fairseq log reports (None before the first)."""
    if not log.exists():
        return None
    with open(log, "rb") as f:
        f.seek(max(0, log.stat().st_size - 8192))
        found = _UPDATES.findall(f.read().decode("utf-8", errors="replace"))
    return int(found[-1]) if found else None


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


def _tree_pss_mb(pid: int) -> float:
    return pss_mb(pid) + sum(_tree_pss_mb(c) for c in _children(pid))
