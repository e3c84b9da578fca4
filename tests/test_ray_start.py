"""A RayPool whose node actors cannot start: it says why, at once, and leaves nothing running.

No KVM needed: the node's Pool is refused by its own argument checks (on a host without
/dev/kvm, KvmUnavailableError takes the same way). A real local Ray, on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import time

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: see tests/test_ray.py
ray = pytest.importorskip("ray")

from hlpool.errors import HlpoolError  # noqa: E402


def _descendants_alive(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    states: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
            states[int(entry)] = fields[0]
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if states.get(child) != "Z":
                out.append(child)
            todo.append(child)
    return out


def test_a_node_whose_actor_refuses_to_start_fails_the_pool_at_once_with_its_reason(tmp_path):
    from hlpool.ray import RayPool

    if ray.is_initialized():  # another module's cluster: this test starts (and owns) its own
        ray.shutdown()
    before = set(_descendants_alive(os.getpid()))  # e.g. other modules' pools: not this test's to judge
    with pytest.raises(HlpoolError) as raised:
        # max_pending=0 makes every node's Pool() raise in its constructor, as a host without KVM does
        RayPool(workers_per_node=1, snapshot_dir=tmp_path / "driver", node_snapshot_dir=str(tmp_path / "node"),
                pool_options={"max_pending": 0}, start_timeout=600, poll_interval=0.5,
                ray_init={"_node_ip_address": "127.0.0.1", "include_dashboard": False, "num_cpus": 1})
    message = str(raised.value)
    # it gave up because the node refused, not after the 600 s start timeout, and names the cause
    assert "only 0 of 1 Ray node(s) started an hlpool actor (each node that has not joined refused it)" in message
    assert "ValueError: workers and max_pending must be >= 1" in message
    assert not ray.is_initialized()  # the Ray it started is shut down
    deadline = time.monotonic() + 30
    while set(_descendants_alive(os.getpid())) - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert set(_descendants_alive(os.getpid())) - before == set()  # Ray's processes and the node's are gone
