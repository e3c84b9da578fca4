"""What the supervisor reads about processes from /proc, and its descriptor limit."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("hlpool.pool.supervisor")


def process_state(pid: int) -> str:
    """The state letter of ``pid`` from /proc (R, S, D, T, t, Z...), or "" if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return ""


def memory_of(pid: int) -> dict[str, int]:
    values = {"rss_kib": 0, "pss_kib": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss"):
                    values[f"{key.lower()}_kib"] = int(rest.split()[0])
    except OSError:
        pass
    return values


def raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
        except (ValueError, OSError):
            log.warning("cannot raise RLIMIT_NOFILE to %d (hard limit %d)", wanted, hard)
