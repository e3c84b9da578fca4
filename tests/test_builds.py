"""Snapshot builds in builder processes: deadlines, memory limits, guest-memory caps; the store's
quota, removal and garbage collection. Real VMs, real forked builders, hostile guests."""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path

import pytest
from leakcheck import hlpool_processes

import hlpool
from hlpool import GuestImageError, GuestTimeout, MemoryConfig, Pool, SnapshotError, SnapshotTooLargeError
from hlpool.pool.store import SnapshotStore

pytestmark = pytest.mark.kvm

MIB = 1 << 20


def builders() -> list[int]:
    return [pid for pid, comm in hlpool_processes().items() if comm == "hlpool-builder"]


def shm_names() -> list[str]:
    """Shared-memory names this process's pools created (they carry the creator's pid)."""
    mine = (f"hlpool-{os.getpid()}-", f"sem.hlpool-{os.getpid()}-")
    return [n for n in os.listdir("/dev/shm") if n.startswith(mine)]


def temp_files(store: Path) -> list[str]:
    return [p.name for p in store.iterdir() if ".tmp-" in p.name or p.name.endswith(".part")]


def snapshot_files(store: Path) -> set[str]:
    return {p.name for p in store.iterdir() if p.name.endswith(".hlsnap") and not p.name.startswith(".")}


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class RssWatch:
    """The highest RSS of this (the supervisor's) process while the block runs, sampled every 5 ms."""

    def __enter__(self) -> "RssWatch":
        gc.collect()
        self.before = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def growth(self) -> int:
        return self.peak - self.before


@pytest.fixture
def store(tmp_path) -> Path:
    d = tmp_path / "store"
    d.mkdir()
    return d


@pytest.fixture
def no_leaks(kvm, store):
    """Fail the test if it leaves processes (builders included), shared-memory names or temporary files."""
    before_procs = set(hlpool_processes())
    before_shm = set(shm_names())
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (set(hlpool_processes()) - before_procs or set(shm_names()) - before_shm):
        time.sleep(0.05)
    assert set(hlpool_processes()) - before_procs == set(), "processes left behind"
    assert set(shm_names()) - before_shm == set(), "shared-memory names left behind"
    assert temp_files(store) == [], "temporary files left in the store"


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    """guest(name, source) -> path of a guest ELF built from C ``source`` (cached per module)."""
    from hlpool.guest.build import build_guest

    out_dir = tmp_path_factory.mktemp("build-guests")
    built: dict[str, str] = {}

    def get(name: str, source: str) -> str:
        if name not in built:
            (out_dir / f"{name}.c").write_text(source)
            built[name] = str(build_guest([out_dir / f"{name}.c"], out_dir / f"{name}.elf"))
        return built[name]

    return get


LOOP = r"""
#include <hlpool.h>
int hl_main(void) { for (;;) __asm__ volatile(""); }
"""

HUGE_BSS = r"""
#include <hlpool.h>
static char big[480 << 20];
static hl_value peek(const hl_args *a) { return hl_int(big[hl_arg_int(a, 0)]); }
int hl_main(void) { big[0] = 1; hl_export("peek", peek); return 0; }
"""

TOUCH = r"""
#include <hlpool.h>
#include <stdlib.h>
static char *area;
static hl_value first(const hl_args *a) { (void)a; return hl_int(area[0]); }
int hl_main(void) {
    size_t size = (size_t)200 << 20;
    area = malloc(size);
    if (!area) return 1;
    for (size_t i = 0; i < size; i += 4096) area[i] = 1;
    hl_export("first", first);
    return 0;
}
"""

SPIN = r"""
#include <hlpool.h>
#include <time.h>
static hl_value spin(const hl_args *a) {
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    double seconds = hl_arg_float(a, 0);
    do clock_gettime(CLOCK_MONOTONIC, &t);
    while ((t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9 < seconds);
    return hl_none();
}
int hl_main(void) { hl_export("spin", spin); return 0; }
"""


# ---- limits ------------------------------------------------------------------------------------------


def test_a_looping_hl_main_is_stopped_at_the_build_timeout_while_another_build_completes(
        guest, example, store, no_leaks):
    loop = guest("loop", LOOP)
    outcome: dict[str, object] = {}

    def register_loop() -> None:
        started = time.monotonic()
        try:
            pool.snapshot(loop)
        except BaseException as exc:
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - started

    with Pool(workers=1, snapshot_dir=store, build_timeout=2.0) as pool:
        with RssWatch() as watch:
            thread = threading.Thread(target=register_loop)
            thread.start()
            deadline = time.monotonic() + 5
            while not builders() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert builders(), "the looping build did not start a builder"
            started = time.monotonic()
            add = pool.snapshot(example("add"))  # no lock is held by the looping build
            assert time.monotonic() - started < 1.5 and thread.is_alive()
            assert pool.submit(add, "add", (40, 2)).result(timeout=10) == 42
            thread.join(timeout=10)
        error = outcome["error"]
        assert isinstance(error, GuestImageError), repr(error)
        assert "build timeout of 2 s" in str(error) and loop in str(error)
        assert 2.0 <= outcome["seconds"] < 3.5, outcome["seconds"]
        assert watch.growth < 8 * MIB, f"the supervisor grew by {watch.growth} bytes"
        assert builders() == []
        assert snapshot_files(store) == {os.path.basename(add.path)}
        assert pool.submit(add, "add", (1, 2)).result(timeout=10) == 3  # the pool is unharmed


def test_guest_memory_over_the_cap_is_refused_before_anything_runs(guest, example, store, no_leaks):
    big = guest("huge_bss", HUGE_BSS)
    over = hlpool.Snapshot.from_elf(example("add"), heap_size=300 * MIB).persist(store.parent / "over.hlsnap")
    with Pool(workers=1, snapshot_dir=store, max_guest_memory=256 * MIB) as pool:
        builder = pool._snapshots.builder
        with RssWatch() as watch:
            with pytest.raises(SnapshotTooLargeError, match=r"image takes 50\d{7} bytes .*max_guest_memory of "
                                                            r"268435456 bytes"):
                pool.snapshot(big)
            with pytest.raises(SnapshotTooLargeError, match="memory configuration needs .* max_guest_memory"):
                pool.snapshot(example("add"), memory=MemoryConfig(heap_size=512 * MIB))
            # a .hlsnap describing more guest memory than the cap is refused as it is opened
            with pytest.raises(SnapshotTooLargeError, match="over the 268435456-byte limit"):
                pool.snapshot(over.path)
        assert builder.builds == 0, "a builder was started"
        assert watch.growth < 4 * MIB, f"the supervisor grew by {watch.growth} bytes"
        assert snapshot_files(store) == set()
    # a pool whose own memory configuration is over the cap does not start
    with pytest.raises(SnapshotTooLargeError, match="the pool's memory configuration"):
        Pool(workers=1, snapshot_dir=store, memory=MemoryConfig(heap_size=2048 * MIB))


def test_the_builder_memory_limit_stops_a_hostile_build(guest, store, no_leaks):
    """The 480 MiB bss fits a 1 GiB cap, but loading it costs the builder over 1 GB: it is stopped at its
    memory limit, and the supervisor (this process) does not grow. So is a guest that touches 200 MiB."""
    big, toucher = guest("huge_bss", HUGE_BSS), guest("touch200", TOUCH)
    with Pool(workers=1, snapshot_dir=store, max_guest_memory=1024 * MIB, build_memory=128 * MIB,
              memory=MemoryConfig(heap_size=256 * MIB)) as pool:
        for elf in (big, toucher):
            started = time.monotonic()
            with RssWatch() as watch:
                with pytest.raises(GuestImageError, match=r"more than its memory limit of 134217728 bytes"):
                    pool.snapshot(elf)
            assert time.monotonic() - started < 10
            assert watch.growth < 8 * MIB, f"the supervisor grew by {watch.growth} bytes"
            assert builders() == []
        assert pool._snapshots.builder.stopped == 2
        assert snapshot_files(store) == set()


def test_identical_builds_at_once_are_built_once(example, store, no_leaks):
    with Pool(workers=1, snapshot_dir=store) as pool:
        results: list[object] = []
        threads = [threading.Thread(target=lambda: results.append(pool.snapshot(example("echo")))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 4 and len({r.path for r in results}) == 1
        assert pool._snapshots.builder.builds == 1


# ---- the store ---------------------------------------------------------------------------------------


def test_quota_collects_garbage_first_then_refuses(example, store, tmp_path, no_leaks):
    sizes = {name: os.path.getsize(hlpool.Snapshot.from_elf(example(name)).persist(tmp_path / f"{name}.hlsnap").path)
             for name in ("add", "echo")}
    stray = hlpool.Snapshot.from_elf(example("echo")).persist(store / ("0" * 32 + ".hlsnap"))
    quota = sizes["add"] + sizes["echo"] // 2  # room for either snapshot, not for both
    with Pool(workers=1, snapshot_dir=store, store_quota=quota) as pool:
        add = pool.snapshot(example("add"))  # over the quota with the stray file: it is collected
        assert snapshot_files(store) == {os.path.basename(add.path)}
        assert not os.path.exists(stray.path)
        with pytest.raises(SnapshotError, match=r"snapshot store is full.*store_quota"):
            pool.snapshot(example("echo"))  # nothing to collect: refused, its file taken back
        assert snapshot_files(store) == {os.path.basename(add.path)}
        assert pool.remove_snapshot(add) is True
        assert snapshot_files(store) == set()
        echo = pool.snapshot(example("echo"))
        assert pool.submit(echo, "echo", ("fits",)).result(timeout=10) == "fits"
        assert pool.store.usage() <= quota


def test_remove_refuses_while_a_child_or_a_call_needs_the_snapshot(guest, store, no_leaks):
    with Pool(workers=1, snapshot_dir=store, call_timeout=10) as pool:
        parent = pool.snapshot(guest("spin", SPIN))
        with hlpool.Sandbox(hlpool.Snapshot.open(parent.path)) as sb:
            sb.call("spin", 0.0)
            child = pool.snapshot(sb.snapshot())  # a layer in the store naming the parent
        assert hlpool.Snapshot.open(child.path).parent.path == parent.path
        with pytest.raises(SnapshotError, match="1 layered snapshot"):
            pool.remove_snapshot(parent)
        # calls running and queued need the child
        running = [pool.submit(child, "spin", (0.6,)) for _ in range(2)]
        with pytest.raises(SnapshotError, match=r"2 queued or running call\(s\)"):
            pool.remove_snapshot(child.path)
        for f in running:
            assert f.result(timeout=10) is None
        assert pool.remove_snapshot(child) is True
        with pytest.raises(SnapshotError, match="was removed"):
            pool.submit(child, "spin", (0.0,))
        assert pool.remove_snapshot(parent) is True
        assert snapshot_files(store) == set()
        with pytest.raises(SnapshotError, match="not a snapshot of this pool"):
            pool.remove_snapshot(store.parent / "nothing.hlsnap")


def test_collect_garbage_keeps_what_handles_children_and_other_processes_need(example, store, no_leaks):
    with Pool(workers=1, snapshot_dir=store) as pool:
        add = pool.snapshot(example("add"))
        with hlpool.Sandbox(hlpool.Snapshot.open(add.path)) as sb:
            sb.call("add", 1, 2)
            layered = pool.snapshot(sb.snapshot())
        orphan = hlpool.Snapshot.from_elf(example("echo")).persist(store / ("1" * 32 + ".hlsnap"))
        pinned = hlpool.Snapshot.from_elf(example("sha256")).persist(store / ("2" * 32 + ".hlsnap"))
        other = SnapshotStore(store)  # another pool sharing the directory holds one file
        assert other.pin(pinned.path)
        assert pool.collect_garbage() == [orphan.path]
        assert snapshot_files(store) == {os.path.basename(p) for p in (add.path, layered.path, pinned.path)}
        pool.remove_snapshot(layered)
        pool.remove_snapshot(add)  # the handle goes, the file too
        other.release()
        assert pool.collect_garbage() == [pinned.path]
        assert snapshot_files(store) == set()


def test_the_script_builder_drops_its_pins_with_the_next_request_or_when_asked(store, no_leaks):
    # The builder pins each answer's layer (and the base) until the supervisor has pinned the file;
    # it is told so with its next request, or by settle() before anything deletes store files.
    with Pool(workers=1, snapshot_dir=store) as pool:
        first = pool.script("js", "function a() { return 1; }")
        second = pool.script("js", "function b() { return 2; }")
        own = SnapshotStore(str(store))  # another process's view of the pins: only pin files count
        registry_store = pool._snapshots.store
        registry_store.unpin(first.path)  # as if this pool let go of it: nobody pins it once the
        deadline = time.monotonic() + 10  # builder has dropped its pins (right after it answered `second`)
        while first.path in own.pinned_by_anyone() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert first.path not in own.pinned_by_anyone()
        registry_store.unpin(second.path)
        assert second.path in own.pinned_by_anyone()  # the builder still holds its last answer
        pool._snapshots.scripts.settle()
        assert second.path not in own.pinned_by_anyone()
        assert pool.submit(pool.script("js", "function c() { return 3; }"), "c").result(timeout=10) == 3
        # Removing the builder's last answer right away: the removal asks the builder, then deletes.
        last = pool.script("js", "function d() { return 4; }")
        assert pool.remove_snapshot(last) is True
        assert not os.path.exists(last.path)
        own.release()


def test_script_layers_keep_their_base_until_removed(store, no_leaks):
    with Pool(workers=1, snapshot_dir=store) as pool:
        js = pool.script("js", "function inc(n) { return n + 1; }")
        assert pool.submit(js, "inc", (41,)).result(timeout=10) == 42
        base = hlpool.Snapshot.open(js.path).parent.path
        assert pool.collect_garbage() == []
        with pytest.raises(SnapshotError, match="layered snapshot"):
            pool.remove_snapshot(base)
        with pytest.raises(GuestTimeout):
            pool.script("js", "for (;;) {}", timeout=0.5)  # the script's own load deadline
        assert pool.remove_snapshot(js) is True
        assert pool.collect_garbage() == [base]
        assert snapshot_files(store) == set()
