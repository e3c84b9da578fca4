"""Helpers the leak checks of several test modules share."""

from __future__ import annotations

import os


def hlpool_processes() -> dict[int, str]:
    """pid -> name of every live hlpool process (worker, spawner, builder) in this test run's session.

    The session, not the parent chain: a leaked process whose parent died is reparented but
    keeps its session; hlpool processes other people run on the machine are in other sessions.
    """
    session = os.getsid(0)
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if comm.startswith("hlpool-") and fields[0] != "Z" and int(fields[3]) == session:  # state ppid pgrp session ...
            out[int(entry)] = comm
    return out
