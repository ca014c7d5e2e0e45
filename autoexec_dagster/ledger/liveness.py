"""Worker ids and whether the worker behind one is still alive.

A worker id is ``host:boot:pid:start:random``. The boot id and the process start time (both from
Linux's /proc) guard against the two ways a pid lies: a reboot, and the kernel giving a dead
worker's pid to an unrelated process. Where /proc is missing, only an expired lease proves a worker
dead.
"""

import os
import socket
import uuid
from pathlib import Path

HOST = socket.gethostname()


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:12]
    except OSError:
        return "-"


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot, or None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


BOOT = _boot_id()


def new_worker_id() -> str:
    """An id for one executing process, precise enough for recovery to test its liveness."""
    pid = os.getpid()
    return f"{HOST}:{BOOT}:{pid}:{process_start(pid) or '-'}:{uuid.uuid4().hex[:8]}"


def worker_is_dead(worker: str | None) -> bool:
    """True only when the worker provably ran on this machine since its boot and has exited."""
    if not worker:
        return False
    parts = worker.split(":")
    if len(parts) != 5:
        return False
    host, boot, pid_text, start, _ = parts
    if host != HOST or boot != BOOT or boot == "-" or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    current = process_start(pid)
    if current is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    # The pid is in use: by the worker itself only if it started at the same moment.
    return start != "-" and current != start
