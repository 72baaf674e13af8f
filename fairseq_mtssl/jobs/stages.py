"""A small resumable stage runner: named stages with dependencies, run up to ``jobs`` at a time.

Each stage is a Python callable that runs command lines through :meth:`Pipeline.run`, that is through
the one :class:`~.commands.CommandRunner`: each command is recorded in ``{out}/commands.sh``, streams
its output into ``{out}/logs/{stage}.log`` and dies with the runner. A finished stage leaves
``{out}/done/{stage}.json`` holding what it returned, and the next run skips it.

The console shows one line when a stage starts or ends and, every ``heartbeat`` seconds, what is
running (with the latest update of a training stage). Concurrent stages each get ``threads``
intra-op threads, and a sampler records the peak memory (PSS) of all commands together, and of each
stage.
"""

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ..errors import MtsslError
from .commands import MALLOC_TUNABLES, CommandRunner, pss_mb, tree_pss_mb

__all__ = ["MALLOC_TUNABLES", "Pipeline", "StageFailed", "StageSpec"]


class StageFailed(MtsslError, RuntimeError):
    """Stages could not run (an undeclared or failed dependency)."""


@dataclass
class StageSpec:
    name: str
    fn: Callable[[], Optional[dict]]
    after: Sequence[str] = ()
    progress: Optional[Callable[[], Optional[str]]] = None  # a short "what it is doing" for the heartbeat


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
        self.out = Path(out)
        self.jobs, self.force, self.heartbeat = max(1, jobs), force, heartbeat
        self.commands = CommandRunner(
            self.out, threads=max(1, threads), bin_dir=bin_dir, malloc_tunables=malloc_tunables
        )
        self.specs: Dict[str, StageSpec] = {}
        self.results: Dict[str, dict] = {}
        self._lock = threading.Lock()
        self._started: Dict[str, float] = {}
        self.peak_breakdown_mb: Dict[str, float] = {}  # what each running stage held at the peak
        self.stage_peak_mb: Dict[str, float] = {}  # each stage's own peak
        self.t0 = time.time()

    @property
    def env(self) -> Dict[str, str]:
        """The environment the commands get on top of the runner's."""
        return self.commands.env

    # -- declaring ------------------------------------------------------------------------------
    def add(self, name: str, fn, after: Sequence[str] = (), progress=None) -> None:
        missing = [d for d in after if d not in self.specs]
        if missing:
            raise ValueError(f"stage {name!r} depends on undeclared stages {missing}")
        self.specs[name] = StageSpec(name, fn, tuple(after), progress)

    def marker(self, name: str) -> Path:
        return self.commands.done.path(name)

    def run(self, stage: str, cmd: Sequence, cwd: Optional[Path] = None) -> None:
        """Run one command of ``stage`` (see :meth:`CommandRunner.run`)."""
        self.commands.run(stage, cmd, cwd)

    # -- scheduling -----------------------------------------------------------------------------
    def _say(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{time.time() - self.t0:6.0f}s] {msg}", flush=True)

    def _run_stage(self, spec: StageSpec, errors: List[BaseException]) -> None:
        start = time.time()
        try:
            info = spec.fn() or {}
            info["seconds"] = round(time.time() - start, 1)
            self.commands.done.mark(spec.name, info)
            self.results[spec.name] = info
            self._say(f"done     {spec.name} ({info['seconds']:.0f} s)")
        except BaseException as e:  # noqa: BLE001 - reported by execute()
            errors.append(e)
            self._say(f"FAILED   {spec.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        finally:
            with self._lock:
                self._started.pop(spec.name, None)

    def _sample_memory(self, stop: threading.Event) -> None:
        while not stop.wait(0.5):
            by_stage = {"runner": pss_mb(os.getpid())}
            for stage, pid in self.commands.running():
                by_stage[stage] = by_stage.get(stage, 0.0) + tree_pss_mb(pid)
            for stage, mb in by_stage.items():
                self.stage_peak_mb[stage] = max(self.stage_peak_mb.get(stage, 0.0), mb)
            if sum(by_stage.values()) > self.peak_pss_mb:
                self.peak_breakdown_mb = by_stage

    @property
    def peak_pss_mb(self) -> float:
        """The highest sampled total (runner and every running command)."""
        return sum(self.peak_breakdown_mb.values())

    def _skip_finished(self, pending: List[str], done: set) -> None:
        for name in list(pending):
            if self.commands.done.is_done(name) and not self.force:
                self.results[name] = self.commands.done.read(name)
                done.add(name)
                pending.remove(name)
                self._say(f"skipped  {name} (finished earlier: {self.marker(name)})")

    def execute(self) -> Dict[str, dict]:
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        pending = list(self.specs)  # declaration order is the priority order
        done: set = set()
        self._skip_finished(pending, done)
        errors: List[BaseException] = []
        threads: Dict[str, threading.Thread] = {}
        stop = threading.Event()
        threading.Thread(target=self._sample_memory, args=(stop,), daemon=True).start()
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
                    self._start_ready(pending, done, threads, errors)
                    if pending and not threads:
                        raise StageFailed(f"stages {pending} wait on stages that did not finish")
                if time.time() - last_beat >= self.heartbeat and threads:
                    last_beat = time.time()
                    self._say("running  " + "; ".join(self._describe(n) for n in threads))
                time.sleep(0.2)
        except BaseException:
            self.commands.kill_all()  # their own children die with them (child_process)
            raise
        finally:
            stop.set()
        return self.results

    def _start_ready(self, pending: List[str], done: set, threads: Dict[str, threading.Thread], errors) -> None:
        for name in list(pending):
            if len(threads) >= self.jobs:
                return
            spec = self.specs[name]
            if all(d in done for d in spec.after):
                pending.remove(name)
                with self._lock:
                    self._started[name] = time.time()
                self._say(f"start    {name}  ({len(done) + len(threads) + 1}/{len(self.specs)})")
                t = threading.Thread(target=self._run_stage, args=(spec, errors), daemon=True)
                threads[name] = t
                t.start()

    def _describe(self, name: str) -> str:
        spec = self.specs[name]
        with self._lock:
            elapsed = time.time() - self._started.get(name, time.time())
        extra = ""
        if spec.progress is not None:
            try:
                extra = spec.progress() or ""
            except OSError:
                extra = ""
        return f"{name} {elapsed:.0f} s{', ' + extra if extra else ''}"
