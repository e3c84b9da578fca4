"""An event loop collecting its calls' answers itself (Pool.call_future, hlpool.pool.loopcollect):
real workers, real VMs, real asyncio loops; every guarantee of the thread path kept."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

from hlpool import GuestTimeout, Pool, WorkerCrashed

pytestmark = pytest.mark.kvm

LONG = 3 * 10**8  # fib.c compute(): ~0.5 s here


def _fds() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return out


def _eventfds() -> int:
    return sum(1 for target in _fds() if target == "anon_inode:[eventfd]")


def test_the_loop_takes_the_answers_and_they_are_right(kvm, example, tmp_path):
    before = _eventfds()
    with Pool(workers=2, snapshot_dir=tmp_path) as pool:
        echo = pool.snapshot(example("echo"))

        async def main() -> list:
            waves = []
            for wave in range(5):
                waves += await asyncio.gather(*(pool.call(echo, "echo", [wave, i]) for i in range(40)))
            return waves

        assert asyncio.run(main()) == [[w, i] for w in range(5) for i in range(40)]
        stats = pool.stats()
        # the loop, not the pool's threads, took (nearly) every answer
        assert sum(s["loop_answers"] for s in stats) >= 0.9 * 200, stats
        assert sum(s["calls"] for s in stats) == 200
        assert _eventfds() == before + 2  # one per worker slot
    assert _eventfds() == before  # closed with the pool


def test_the_loop_takes_a_busy_workers_answers_in_batches(kvm, example, tmp_path):
    """48 tasks with a call each on one worker: while the backlog keeps the worker busy the loop
    lets answers gather and wakes once for several (it woke for every answer before: ~89 us of
    the loop's CPU per call against 40-44). Answers are right; a pause ends with the pool."""
    with Pool(workers=1, snapshot_dir=tmp_path) as pool:
        echo = pool.snapshot(example("echo"))
        for i in range(20):  # the snapshot's call time is learnt (it sizes the pause)
            assert pool.submit(echo, "echo", (i,)).result(timeout=30) == i

        async def task(k: int) -> list:
            return [await pool.call(echo, "echo", [k, i]) for i in range(10)]

        async def main() -> list:
            return await asyncio.gather(*(task(k) for k in range(48)))

        before = pool.stats()[0]
        assert asyncio.run(main()) == [[[k, i] for i in range(10)] for k in range(48)]
        after = pool.stats()[0]
        answers = after["loop_answers"] - before["loop_answers"]
        reads = after["answer_reads"] - before["answer_reads"]
        assert answers >= 0.9 * 480, after
        assert reads <= 480 // 3, f"{reads} reads for 480 answers: the loop woke for (nearly) each one"


def test_errors_timeouts_and_long_calls_through_the_loop(kvm, example, tmp_path):
    with Pool(workers=1, snapshot_dir=tmp_path) as pool:
        faults = pool.snapshot(example("faults"))
        fib = pool.snapshot(example("fib"))
        echo = pool.snapshot(example("echo"))

        async def main() -> None:
            with pytest.raises(GuestTimeout):
                await pool.call(faults, "infinite_loop", timeout=0.2)
            # longer than the pool thread's watch: it steps in, the answer still reaches the loop
            assert isinstance(await pool.call(fib, "compute", LONG), int)
            assert await pool.call(echo, "echo", "after") == "after"
            waiter = pool.call_future(echo, "echo", ["x"])
            assert await waiter == "x"

        asyncio.run(main())


def test_a_worker_killed_under_loop_calls_resolves_every_one(kvm, example, tmp_path):
    with Pool(workers=1, snapshot_dir=tmp_path) as pool:
        fib = pool.snapshot(example("fib"))
        echo = pool.snapshot(example("echo"))
        pid = pool.stats()[0]["pid"]

        async def main() -> list:
            running = pool.call_future(fib, "compute", [LONG])
            behind = [pool.call_future(echo, "echo", [i]) for i in range(8)]
            await asyncio.sleep(0.15)
            os.kill(pid, signal.SIGKILL)
            return await asyncio.gather(running, *behind, return_exceptions=True)

        outcome = asyncio.run(asyncio.wait_for(main(), 60))
        assert isinstance(outcome[0], WorkerCrashed)
        assert outcome[1:] == list(range(8))  # never taken by the dead worker: run on the replacement
        assert pool.stats()[0]["pid"] != pid


def test_cancelling_a_queued_loop_call_drops_it(kvm, example, tmp_path):
    with Pool(workers=1, snapshot_dir=tmp_path) as pool:
        fib = pool.snapshot(example("fib"))
        echo = pool.snapshot(example("echo"))

        async def main() -> None:
            busy = [pool.call_future(fib, "compute", [LONG // 10]) for _ in range(20)]  # past the channel
            last = pool.call_future(echo, "echo", ["late"])
            last.cancel()
            await asyncio.gather(*busy)

        asyncio.run(main())
        assert sum(s["calls"] for s in pool.stats()) == 20  # the cancelled call never ran


def test_a_second_loop_and_a_closed_loop_still_work(kvm, example, tmp_path):
    with Pool(workers=1, snapshot_dir=tmp_path) as pool:
        echo = pool.snapshot(example("echo"))
        first = asyncio.new_event_loop()
        try:
            assert first.run_until_complete(pool.call(echo, "echo", 1)) == 1
            results: list = []

            def other_thread() -> None:  # the first loop still exists: this one takes the thread path
                results.append(asyncio.run(pool.call(echo, "echo", 2)))

            t = threading.Thread(target=other_thread)
            t.start()
            t.join(30)
            assert results == [2]
        finally:
            first.close()
        # the first loop is closed: a new loop is watched instead
        assert asyncio.run(pool.call(echo, "echo", 3)) == 3
        assert [pool.submit(echo, "echo", (4,)).result(timeout=30)] == [4]


def test_shutdown_from_another_thread_while_the_loop_runs(kvm, example, tmp_path):
    before = _eventfds()
    pool = Pool(workers=2, snapshot_dir=tmp_path)
    echo = pool.snapshot(example("echo"))

    async def main() -> None:
        assert await pool.call(echo, "echo", 1) == 1
        await asyncio.get_running_loop().run_in_executor(None, pool.shutdown)
        await asyncio.sleep(0.05)  # the loop runs the scheduled unwatch-and-close

    asyncio.run(main())
    deadline = time.monotonic() + 5
    while _eventfds() != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _eventfds() == before


def test_call_future_never_blocks_the_loop_when_the_pool_is_full(kvm, example, tmp_path):
    from hlpool import PoolOverloadedError

    with Pool(workers=1, snapshot_dir=tmp_path, max_pending=2) as pool:
        fib = pool.snapshot(example("fib"))

        async def main() -> None:
            running = [pool.call_future(fib, "compute", [LONG // 5]) for _ in range(2)]
            start = time.monotonic()
            with pytest.raises(PoolOverloadedError):
                pool.call_future(fib, "compute", [1])  # raises at once, even though the pool blocks
            assert time.monotonic() - start < 0.05
            assert all(isinstance(v, int) for v in await asyncio.gather(*running))
            assert isinstance(await pool.call(fib, "compute", 1), int)  # room again

        asyncio.run(main())


def test_every_way_a_loop_call_ends_frees_its_pending_slot(kvm, example, tmp_path):
    """A loop call's future is settled by the loop itself (LoopCallFuture): answers, guest errors,
    timeouts, a cancelled queued call, a cancelled running call and a crash each give back their
    pending slot, so a pool with max_pending=4 keeps taking calls afterwards."""
    from hlpool import GuestError, PoolOverloadedError

    with Pool(workers=1, snapshot_dir=tmp_path, max_pending=4) as pool:
        faults = pool.snapshot(example("faults"))
        fib = pool.snapshot(example("fib"))
        echo = pool.snapshot(example("echo"))

        async def rounds() -> None:
            for k in range(3):
                assert await pool.call(echo, "echo", k) == k
                with pytest.raises(GuestError, match="failed on purpose"):
                    await pool.call(faults, "fail", "x")
                with pytest.raises(GuestTimeout):
                    await pool.call(faults, "infinite_loop", timeout=0.1)
                running = pool.call_future(fib, "compute", [LONG // 10])
                queued = pool.call_future(echo, "echo", ["never"])
                queued.cancel()
                await asyncio.sleep(0.02)
                running.cancel()  # it runs on; its answer comes later, unobserved
                with pytest.raises(asyncio.CancelledError):
                    await running
            pid = pool.stats()[0]["pid"]
            crashing = pool.call_future(fib, "compute", [LONG])
            await asyncio.sleep(0.1)
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(WorkerCrashed):
                await crashing
            # every slot is back: four calls at once are taken, a fifth is refused at once
            deadline = time.monotonic() + 10
            while True:
                try:
                    batch = [pool.call_future(echo, "echo", [i]) for i in range(4)]
                    break
                except PoolOverloadedError:  # the cancelled running calls still finishing
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
            with pytest.raises(PoolOverloadedError):
                pool.call_future(echo, "echo", ["fifth"])
            assert await asyncio.gather(*batch) == [0, 1, 2, 3]

        asyncio.run(asyncio.wait_for(rounds(), 60))
