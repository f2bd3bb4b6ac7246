"""Side-by-side fine-tune workers do not outlive a killed pipeline (r2m_lab.processes.exit_with_parent)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO

# A parent with a spawn pool like the pipeline's: it prints its worker's pid, gives it an hour of work, and waits.
PARENT = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from r2m_lab.processes import exit_with_parent
watch = sys.argv[1] == "watch"
kwargs = {"initializer": exit_with_parent, "initargs": (os.getpid(), 0.1)} if watch else {}
pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), **kwargs)
print(pool.submit(os.getpid).result(), flush=True)
pool.submit(time.sleep, 3600)
time.sleep(3600)
"""


def alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited (nobody reaped it yet)
    except (FileNotFoundError, ProcessLookupError):
        return False


def worker_after_parent_killed(mode: str) -> bool:
    """Start the parent, SIGKILL it (no cleanup of its own can run), and say whether its worker still runs 5 s later."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE, text=True, env=env)
    worker = int(parent.stdout.readline())
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 5
        while alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        return alive(worker)
    finally:
        if alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_a_worker_exits_when_its_pipeline_is_killed():
    assert not worker_after_parent_killed("watch")


def test_without_the_watch_the_worker_would_outlive_it():
    # the failure the watch prevents, shown on the same setup: a plain pool's worker goes on as an orphan
    assert worker_after_parent_killed("plain")
