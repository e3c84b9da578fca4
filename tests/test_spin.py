"""Spin-then-sleep waits (hlpool.pool.spin) on a real channel's semaphores posted by a real other
process, and a Pool with and without spinning giving the same answers and keeping its deadlines."""

from __future__ import annotations

import os
import time

import pytest

from hlpool import GuestTimeout, Pool
from hlpool.pool import channel as ipc
from hlpool.pool import spin
from hlpool.pool._slots import SharedSemaphore


@pytest.fixture
def semaphore():
    channel = ipc.Channel.create(2, 4096)
    channel.unlink()
    yield channel.responses
    channel.close()


def _post_later(sem: SharedSemaphore, delay: float) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            time.sleep(delay)
            sem.release()
        finally:
            os._exit(0)
    return pid


def test_poll_takes_a_post_that_comes_in_time(semaphore):
    pid = _post_later(semaphore, 0.005)
    try:
        assert spin.poll(semaphore, time.monotonic_ns() + 2_000_000_000)
        assert semaphore.value == 0  # taken, once
    finally:
        os.waitpid(pid, 0)


def test_poll_gives_up_at_its_instant_and_takes_nothing(semaphore):
    start = time.monotonic_ns()
    assert not spin.poll(semaphore, start + 3_000_000)
    assert time.monotonic_ns() - start >= 3_000_000
    pid = _post_later(semaphore, 0.05)  # comes after the poll ended: left for the next wait
    os.waitpid(pid, 0)
    assert semaphore.value == 1


def test_a_worker_polls_only_while_requests_follow_answers_closely(semaphore):
    wait = spin.NextRequestWait()
    for _ in range(20):  # the request is there at once: the gap learnt is short, polling starts
        semaphore.release()
        wait.wait(semaphore)
    assert wait.gap_ns < spin.WORKER_SPIN_MAX_NS
    polled = wait.polled
    for _ in range(6):  # requests come 20 ms apart: longer than any poll, so the worker sleeps
        pid = _post_later(semaphore, 0.02)
        wait.wait(semaphore)
        os.waitpid(pid, 0)
    assert wait.gap_ns >= spin.WORKER_SPIN_MAX_NS
    after_long_gaps = wait.polled
    pid = _post_later(semaphore, 0.02)
    wait.wait(semaphore)  # slept: the poll is not even tried
    os.waitpid(pid, 0)
    assert wait.polled == after_long_gaps
    assert polled > 0

    off = spin.NextRequestWait(enabled=False)
    for _ in range(20):
        semaphore.release()
        off.wait(semaphore)
    assert off.polled == 0


@pytest.mark.kvm
@pytest.mark.parametrize("spin_wait", [True, False])
def test_pool_answers_and_deadlines_with_and_without_spinning(kvm, example, tmp_path, spin_wait):
    with Pool(workers=1, snapshot_dir=tmp_path, spin_wait=spin_wait) as pool:
        echo = pool.snapshot(example("echo"))
        assert [pool.submit(echo, "echo", (i,)).result(timeout=30) for i in range(200)] == list(range(200))
        faults = pool.snapshot(example("faults"))
        future = pool.submit(faults, "infinite_loop", timeout=0.3)
        start = time.monotonic()
        with pytest.raises(TimeoutError):  # the caller's own wait limit holds while it polls
            future.result(timeout=0.05)
        assert time.monotonic() - start < 0.25
        with pytest.raises(GuestTimeout):
            future.result(timeout=30)
        assert pool.submit(echo, "echo", ("after",)).result(timeout=30) == "after"
