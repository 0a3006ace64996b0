"""Supervision of the training processes: exit statuses, the supervised launch (the whole process
group is stopped on cancel), output that survives losing its reader, and the orphan watchdog."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved at a step boundary after SIGTERM/SIGINT; launch again to resume


EXIT_ROLLBACK = 76   # diverged: relaunch, the resume path reloads the checkpoint named in rollback.json


EXIT_DIVERGED = 77   # diverged and stopped: diverged.json says why


SUPERVISOR_ENV = "D2A_SUPERVISOR_PID"  # the worker stops (saving) when this process is gone


class TrainingInterrupted(RuntimeError):
    """The worker was preempted or killed; its checkpoints are intact, launching again resumes."""


class TrainingDiverged(RuntimeError):
    """The divergence guard stopped the run (see diverged.json in the run directory)."""

PREEMPTED_MARK, ROLLBACK_FILE, DIVERGED_FILE = "preempted.json", "rollback.json", "diverged.json"


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.info["pid"]) == pgid:
                out.append(p.info["pid"])
    return out


def supervise(cmd: list[str], logger: logging.Logger, grace_s: float = 60.0, env: dict[str, str] | None = None) -> int:
    """Run the worker in its own process group, stream its output line by line into the log, and
    make sure no rank outlives us. Cancellation, Ctrl-C or an exception here SIGTERMs the whole
    group (ranks save at the next step boundary), then SIGKILLs whatever is left after grace_s.
    If this process itself is killed outright, the workers notice (SUPERVISOR_ENV) and stop."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", SUPERVISOR_ENV: str(os.getpid()), **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=env, start_new_session=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                logger.info("%s", line)
        return proc.wait()
    finally:
        _stop_group(proc, grace_s)


def _stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    pgid = proc.pid  # start_new_session: the leader's pid is the group id
    proc.poll()
    if not _group_members(pgid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, so it does not count as alive
        if not _group_members(pgid):
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    # SIGKILL is delivered asynchronously: return only once no member of the group is still running
    deadline = time.monotonic() + 10
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


class _SafeStream:
    """stdout/stderr that survive losing the reader: the supervisor's pipe breaks when it is killed,
    and a print must not crash the rank before it has saved; output goes on to a file instead."""

    def __init__(self, stream, fallback: Path):
        self.stream, self.fallback = stream, fallback

    def _swap(self) -> None:
        self.stream = open(self.fallback, "a", encoding="utf-8", buffering=1)

    def write(self, s: str) -> int:
        try:
            return self.stream.write(s)
        except (BrokenPipeError, ValueError, OSError):
            self._swap()
            return self.stream.write(s)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (BrokenPipeError, ValueError, OSError):
            self._swap()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _watch_supervisor(stop: dict[str, bool]) -> None:
    """If the process that launched us dies without stopping us (the flow run's process was killed
    outright), stop at the next step boundary like a preemption: no rank is left running unsupervised."""
    pid = os.environ.get(SUPERVISOR_ENV)
    if not pid:
        return
    import psutil

    try:
        sup = psutil.Process(int(pid))
    except psutil.Error:
        stop["flag"] = stop["orphaned"] = True
        return

    def watch() -> None:
        while not stop["flag"]:
            try:
                gone = not sup.is_running() or sup.status() == psutil.STATUS_ZOMBIE
            except psutil.Error:
                gone = True
            if gone:
                print(f"supervisor (pid {pid}) is gone: stopping at the next step boundary", flush=True)
                stop["flag"] = stop["orphaned"] = True
                return
            time.sleep(0.5)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def _process_start(fallback: float) -> float:
    """When this process was created (the launcher's own start-up before it counts too)."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil missing on a bare node: from the worker's entry
        return fallback
