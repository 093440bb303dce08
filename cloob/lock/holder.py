"""A lock's record: who holds it (host, pid, start time, lease), and whether that holder is gone."""

from __future__ import annotations

import json
import os
import socket
import uuid
from datetime import UTC, datetime

import psutil

from cloob.errors import CloobError

LOCK_NAME = "lock.json"
DEFAULT_LEASE_S = 120.0


def lease_s_default() -> float:
    return float(os.environ.get("CLOOB_LOCK_LEASE_S", DEFAULT_LEASE_S))


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _record(purpose: str, lease_s: float) -> dict:
    return {"purpose": purpose, "host": socket.gethostname(), "pid": os.getpid(),
            "started": psutil.Process().create_time(), "boot_id": _boot_id(), "pid_namespace": _pid_namespace(),
            "since": datetime.now(UTC).isoformat(timespec="seconds"), "lease_s": lease_s,
            "token": uuid.uuid4().hex}


def _gone(rec: dict) -> str | None:
    """Why the holder is certainly gone, if that can be told from here; else None (alive, or a
    process this machine cannot see)."""
    if rec.get("host") != socket.gethostname():
        return None
    if rec.get("boot_id") and _boot_id() and rec["boot_id"] != _boot_id():
        return "this machine has restarted since"
    if rec.get("pid_namespace", "") != _pid_namespace():
        return None  # another container on this host: its pid means nothing here
    try:
        p = psutil.Process(int(rec["pid"]))
        if p.status() == psutil.STATUS_ZOMBIE:
            return "its process has ended"
        if abs(p.create_time() - float(rec["started"])) > 0.5:
            return "its process has ended (its pid now belongs to another process)"
        return None
    except psutil.NoSuchProcess:
        return "its process has ended"
    except (psutil.Error, KeyError, TypeError, ValueError):
        return None  # cannot tell (access denied, an odd record): treat it as alive


def _stale(rec: dict, age_s: float) -> str | None:
    """Why this lock may be taken over, or None if its holder may still be at work."""
    why = _gone(rec)
    if why:
        return why
    if rec.get("host") == socket.gethostname() and rec.get("pid_namespace", "") == _pid_namespace():
        return None  # a live process of this machine: its lease does not matter
    lease = float(rec.get("lease_s", DEFAULT_LEASE_S))
    if age_s > lease:
        return f"it was not renewed for {age_s:.0f} s (its lease is {lease:g} s)"
    return None


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s} s" if s < 120 else f"{s // 60} min" if s < 7200 else f"{s // 3600} h"


def _dump(rec: dict) -> bytes:
    return json.dumps(rec, indent=1, sort_keys=True).encode()


def _parse(data: bytes, where: str) -> dict:
    try:
        rec = json.loads(data)
    except ValueError:
        rec = None
    if not isinstance(rec, dict) or "token" not in rec:
        raise CloobError(f"{where} is not a lock that cloob can read",
                         "if no cloob command is using that folder, delete the file and rerun")
    return rec
