"""The main job's stage runner: order, skipping finished stages, failures, and no orphans after kill -9."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fairseq_mtssl.jobs.commands import MALLOC_TUNABLES, CommandFailed
from fairseq_mtssl.jobs.stages import Pipeline
from fairseq_mtssl.jobs.training_log import latest_update


def _pipeline(out: Path, calls: list, fail: str = "", jobs: int = 2) -> Pipeline:
    p = Pipeline(out, jobs=jobs, heartbeat=3600)

    def stage(name):
        def fn():
            calls.append(name)
            code = "import sys; sys.exit(3)" if name == fail else f"print('ran {name}')"
            p.run(name, [sys.executable, "-c", code])
            return {"name": name}

        return fn

    p.add("a", stage("a"))
    p.add("b", stage("b"), after=["a"])
    p.add("c", stage("c"), after=["a"])
    p.add("d", stage("d"), after=["b", "c"])
    return p


def test_stages_run_after_their_dependencies_and_are_skipped_when_finished(tmp_path):
    calls = []
    results = _pipeline(tmp_path, calls).execute()
    assert calls[0] == "a" and calls[-1] == "d" and sorted(calls) == ["a", "b", "c", "d"]
    assert set(results) == {"a", "b", "c", "d"} and results["d"]["name"] == "d"
    assert json.loads((tmp_path / "done" / "b.json").read_text())["name"] == "b"
    commands = (tmp_path / "commands.sh").read_text()
    assert (
        sum(line.startswith("# ") for line in commands.splitlines()) == 4
        and "# c\n" in commands
        and "ran c" in commands
    )
    assert "ran b" in (tmp_path / "logs" / "b.log").read_text()

    again = []
    (tmp_path / "done" / "c.json").unlink()  # as if c had been interrupted
    _pipeline(tmp_path, again).execute()
    assert again == ["c"]


def test_a_failing_stage_stops_the_job_names_its_log_and_leaves_no_marker(tmp_path):
    calls = []
    with pytest.raises(CommandFailed, match=r"\[b\] .* exited with 3; full log: .*logs/b.log"):
        _pipeline(tmp_path, calls, fail="b", jobs=1).execute()
    assert "d" not in calls
    assert not (tmp_path / "done" / "b.json").exists() and (tmp_path / "done" / "a.json").exists()


def test_undeclared_dependency_is_refused(tmp_path):
    with pytest.raises(ValueError, match="undeclared"):
        Pipeline(tmp_path).add("x", lambda: None, after=["nope"])


def test_latest_update_reads_the_tail_of_a_fairseq_log(tmp_path):
    log = tmp_path / "hydra_train.log"
    assert latest_update(log) is None
    log.write_text(
        "x\n" * 5000 + "[train_inner] loss=1.0, num_updates=10\n[train_inner] loss=0.9, num_updates=20, lr=1\n"
    )
    assert latest_update(log) == 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_kill_9_of_the_runner_leaves_no_orphan_command(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = tmp_path / "runner.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys
        from fairseq_mtssl.jobs.stages import Pipeline
        p = Pipeline({str(tmp_path / "run")!r}, heartbeat=3600)
        code = "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
        p.add("sleep", lambda: p.run("sleep", [sys.executable, "-c", code]))
        p.execute()
    """)
    )
    runner = subprocess.Popen([sys.executable, str(script)])
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    os.kill(runner.pid, signal.SIGKILL)
    runner.wait()
    deadline = time.time() + 10
    while time.time() < deadline and _alive(child):
        time.sleep(0.1)
    assert not _alive(child), "the command outlived its killed runner"


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.split(")")[-1].split()[0] != "Z"  # a zombie is dead, only not yet reaped


def test_memory_is_attributed_to_the_stage_that_holds_it(tmp_path):
    """A stage whose command holds 200 MB shows up with that much in the per-stage peaks and at the peak."""
    p = Pipeline(tmp_path, jobs=2, heartbeat=3600)
    hold = "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(2)"
    p.add("big", lambda: p.run("big", [sys.executable, "-c", hold]))
    p.add("small", lambda: p.run("small", [sys.executable, "-c", "import time; time.sleep(2)"]))
    p.execute()
    assert p.stage_peak_mb["big"] > 190 and p.stage_peak_mb["small"] < 100
    assert p.peak_breakdown_mb["big"] > 190 and p.peak_pss_mb >= sum(p.peak_breakdown_mb.values()) - 1e-6


def test_commands_get_the_malloc_tunables_unless_the_caller_set_their_own(tmp_path, monkeypatch):
    show = "import os; print('TUNABLES=' + os.environ.get('GLIBC_TUNABLES', 'unset'))"
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    for name, kwargs in (("tuned", {}), ("off", {"malloc_tunables": ""})):
        p = Pipeline(tmp_path / name, heartbeat=3600, **kwargs)
        p.add("s", lambda p=p: p.run("s", [sys.executable, "-c", show]))
        p.execute()
    assert f"TUNABLES={MALLOC_TUNABLES}" in (tmp_path / "tuned" / "logs" / "s.log").read_text()
    assert f"GLIBC_TUNABLES={MALLOC_TUNABLES} " in (tmp_path / "tuned" / "commands.sh").read_text()
    assert "TUNABLES=unset" in (tmp_path / "off" / "logs" / "s.log").read_text()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=1")
    p = Pipeline(tmp_path / "own", heartbeat=3600)
    p.add("s", lambda: p.run("s", [sys.executable, "-c", show]))
    p.execute()
    assert "TUNABLES=glibc.malloc.arena_max=1" in (tmp_path / "own" / "logs" / "s.log").read_text()
