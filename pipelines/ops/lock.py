"""The project's retrain lock: one retrain at a time, whoever starts it.

``.dvc/tmp/retrain.lock`` is an OS file lock (released if the holder dies); beside it,
``retrain.holder.json`` says who holds it (pid, host, flow run, since when), so a waiting or
refused run can name the run it waits for.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = Path(".dvc/tmp/retrain.lock")
HOLDER_FILE = Path(".dvc/tmp/retrain.holder.json")


class RetrainBusy(RuntimeError):
    """Another retrain run holds the lock and did not finish within the wait."""


@contextmanager
def retrain_lock(root: Path, wait_s: float) -> Iterator[None]:
    """Hold the project's retrain lock; wait up to ``wait_s`` for another holder, then raise
    :class:`RetrainBusy` naming it (pid, host, flow run, since when)."""
    from filelock import FileLock, Timeout

    lock_path = root / LOCK_FILE
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"retrain: another retrain is running ({_holder(root)}); waiting up to "
              f"{wait_s:.0f} s")
        try:
            lock.acquire(timeout=wait_s, poll_interval=1.0)
        except Timeout:
            raise RetrainBusy(f"another retrain is still running after {wait_s:.0f} s "
                              f"({_holder(root)}); this run was refused and changed nothing "
                              f"(lock: {lock_path})") from None
    try:
        (root / HOLDER_FILE).write_text(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "flow_run": _flow_run_id(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        yield
    finally:
        (root / HOLDER_FILE).unlink(missing_ok=True)
        lock.release()


def _holder(root: Path) -> str:
    try:
        info = json.loads((root / HOLDER_FILE).read_text())
    except (OSError, ValueError):
        return "holder unknown"
    run = f", flow run {info['flow_run']}" if info.get("flow_run") else ""
    return f"pid {info.get('pid')} on {info.get('host')}{run}, since {info.get('since')}"


def _flow_run_id() -> str | None:
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return str(context.flow_run.id) if context and context.flow_run else None
