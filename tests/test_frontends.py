"""`hlpool serve --frontends K`: K real front-end processes on one port, each with its own pool.

Real `hlpool serve` processes on 127.0.0.1 with real workers and VMs. Every
answer of a front end names it (``X-Hlpool-Frontend: PID``); a new connection
lands on a front end the kernel picks (SO_REUSEPORT), so a test that needs a
given front end opens connections until that one answers.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from test_server import (CLEAN_ENV, HLPOOL, Server, alive, assert_stopped_cleanly, descendants, http, proc_stat,
                         shm_names_of, start_server)

pytestmark = pytest.mark.kvm

TRIES = 400  # new connections to reach a given front end (each lands on one of 2 at random)


def frontends(server: Server) -> dict[int, str]:
    """The front ends: children of the server process (a front end's fresh child has its name for a moment)."""
    out = {}
    for pid, comm in descendants(server.pid).items():
        stat = proc_stat(pid)
        if comm.startswith("hlpool-fe-") and stat is not None and stat[2] == server.pid:
            out[pid] = comm
    return out


def run_dir(server: Server) -> Path:
    match = re.search(r"run directory (\S+)", server.log())
    assert match, server.log()
    return Path(match.group(1))


def request_via(server: Server, pid: int, method: str, path: str, body=None):
    """(status, body) of an idempotent request answered by front end ``pid``."""
    for _ in range(TRIES):
        status, answer, headers = http(method, server.url + path, body)
        if headers.get("X-Hlpool-Frontend") == str(pid):
            return status, answer
    raise AssertionError(f"front end {pid} answered none of {TRIES} connections")


def shm_of(pids) -> list[str]:
    return [n for pid in pids for n in shm_names_of(pid)]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("frontends-store")


@pytest.fixture(scope="module")
def server(kvm, tmp_path_factory, store):
    srv = start_server(tmp_path_factory.mktemp("frontends"), "--frontends", "2", store=store)
    helpers = descendants(srv.pid)
    rundir = run_dir(srv)
    yield srv
    helpers.update(descendants(srv.pid))
    fes = [p for p, comm in helpers.items() if comm.startswith("hlpool-fe-")]
    assert_stopped_cleanly(srv, helpers)
    assert shm_of(fes) == [], "shared-memory names left behind"
    assert not rundir.exists(), "the run directory was left behind"


def test_two_frontends_each_with_its_own_worker(server):
    fes = frontends(server)
    assert sorted(fes.values()) == ["hlpool-fe-0", "hlpool-fe-1"]
    tree = descendants(server.pid)
    for pid in fes:
        mine = descendants(pid)
        assert sorted(mine.values()) == ["hlpool-spawner", "hlpool-worker-0"], mine
    assert sum(comm.startswith("hlpool-worker") for comm in tree.values()) == 2
    seen = set()
    for _ in range(TRIES):
        status, body, headers = http("POST", server.url + "/v1/snapshots/echo/calls/echo", {"args": [7]})
        assert (status, body) == (200, {"result": 7})
        seen.add(int(headers["X-Hlpool-Frontend"]))
        if seen == set(fes):
            break
    assert seen == set(fes), "not every front end answered"
    for pid in fes:
        status, ready = request_via(server, pid, "GET", "/readyz")
        assert status == 200 and ready["ready"] and ready["workers"] == 1
        status, health = request_via(server, pid, "GET", "/healthz")
        assert status == 200 and health["status"] == "ok"


def test_a_name_registered_through_one_frontend_is_served_by_the_other(server):
    source = "function triple(x) { return 3 * x; }"
    status, info, headers = http("POST", server.url + "/v1/snapshots",
                                 {"name": "tri", "language": "js", "source": source})
    assert status == 201, info
    registrar = int(headers["X-Hlpool-Frontend"])
    other = next(pid for pid in frontends(server) if pid != registrar)
    assert request_via(server, other, "POST", "/v1/snapshots/tri/calls/triple", {"args": [14]}) == \
        (200, {"result": 42})
    status, listed = request_via(server, other, "GET", "/v1/snapshots")
    assert "tri" in [s["name"] for s in listed["snapshots"]]
    status, described = request_via(server, other, "GET", "/v1/snapshots/tri")
    assert described["sha256"] == info["sha256"] and described["path"] == info["path"]
    # the same name again, through the other front end: taken
    for _ in range(TRIES):
        status, body, headers = http("POST", server.url + "/v1/snapshots",
                                     {"name": "tri", "language": "js", "source": "function f() { return 1; }"})
        assert status == 409 and body["error"]["code"] == "snapshot_exists", body
        if int(headers["X-Hlpool-Frontend"]) == other:
            break
    else:
        raise AssertionError("the other front end answered none")
    # removed through one front end: gone from both, and its store file goes once neither uses it
    status, removed, headers = http("DELETE", server.url + "/v1/snapshots/tri")
    assert status == 200, removed
    remover = int(headers["X-Hlpool-Frontend"])
    for pid in frontends(server):
        status, body = request_via(server, pid, "POST", "/v1/snapshots/tri/calls/triple", {"args": [1]})
        assert status == 404 and body["error"]["code"] == "unknown_snapshot", (pid, remover, body)
        status, listed = request_via(server, pid, "GET", "/v1/snapshots")
        assert "tri" not in [s["name"] for s in listed["snapshots"]]
    wait_for(lambda: not os.path.exists(info["path"]), 10, "the removed snapshot's file stayed")


def test_metrics_are_summed_over_the_frontends(server):
    def calls_total(text: str) -> float:
        m = re.search(r'^hlpool_calls_total\{function="add",outcome="ok",snapshot="add"\} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0

    fes = list(frontends(server))
    before = calls_total(request_via(server, fes[0], "GET", "/metrics")[1])
    answered = {pid: 0 for pid in fes}
    made = 0
    while min(answered.values()) < 3:  # until each front end answered 3 calls
        assert made < TRIES
        status, body, headers = http("POST", server.url + "/v1/snapshots/add/calls/add", {"args": [made, 1]})
        assert (status, body) == (200, {"result": made + 1})
        answered[int(headers["X-Hlpool-Frontend"])] += 1
        made += 1
    for pid in fes:  # every front end reports all of them (another front end's within a second or so)
        deadline = time.monotonic() + 5
        while True:
            status, text = request_via(server, pid, "GET", "/metrics")
            assert status == 200
            if calls_total(text) == before + made or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert calls_total(text) == before + made, text
        assert re.search(r"^hlpool_workers 2\.0$", text, re.M), text
        assert re.search(r"^hlpool_workers_alive 2\.0$", text, re.M), text
        worker_pids = dict(re.findall(r'^hlpool_worker_pid\{worker="(\d+)"\} (\S+)$', text, re.M))
        assert sorted(worker_pids) == ["0", "1"]
        assert {int(float(p)) for p in worker_pids.values()} == set(server.workers())
        assert re.search(r"^hlpool_calls_in_flight 0\.0$", text, re.M), text


def test_a_killed_frontend_is_replaced_and_the_other_keeps_serving(server):
    status, _, _ = http("POST", server.url + "/v1/snapshots", {"name": "inc", "language": "lua",
                                                               "source": "function inc(x) return x + 1 end"})
    assert status == 201
    fes = frontends(server)
    victim, survivor = sorted(fes)
    victim_helpers = descendants(victim)
    failures: list = []
    stop = threading.Event()

    answered = [0]

    def keep_calling() -> None:
        # A connection that the kernel queued on the killed front end's socket is reset (SO_REUSEPORT);
        # every answer must be right, and the survivor must answer throughout.
        while not stop.is_set():
            try:
                status, body, headers = http("POST", server.url + "/v1/snapshots/echo/calls/echo", {"args": [1]},
                                             timeout=30)
            except OSError:
                continue
            if (status, body) != (200, {"result": 1}):
                failures.append((status, body))
            elif headers["X-Hlpool-Frontend"] == str(survivor):
                answered[0] += 1

    caller = threading.Thread(target=keep_calling)
    caller.start()
    try:
        wait_for(lambda: answered[0] > 0, 30, "the survivor answered nothing")
        os.kill(victim, signal.SIGKILL)
        killed_at = answered[0]
        wait_for(lambda: set(frontends(server)) - {victim, survivor}, 60, "the front end was not replaced")
        replacement = next(pid for pid in frontends(server) if pid not in (victim, survivor))
        assert survivor in frontends(server)
        wait_for(lambda: not any(alive(p) for p in victim_helpers), 10, "the dead front end's workers live on")
        # the replacement serves, the names registered before included
        assert request_via(server, replacement, "POST", "/v1/snapshots/inc/calls/inc", {"args": [41]}) == \
            (200, {"result": 42})
        assert request_via(server, replacement, "GET", "/readyz")[0] == 200
        wait_for(lambda: answered[0] > killed_at, 30, "the survivor stopped answering")
    finally:
        stop.set()
        caller.join(60)
    assert failures == []
    assert shm_of([victim]) == []
    assert re.search(rf"front end \d \(pid {victim}\) was killed by SIGKILL; starting another", server.log())


@pytest.mark.parametrize("to_every_process", [False, True], ids=["to-the-main-process", "to-every-process"])
def test_sigterm_drains_every_frontend(kvm, tmp_path, store, example, to_every_process):
    """SIGTERM to the main process, or to every process of the server at once (what systemd does by
    default): the front ends get it twice, the spawners and workers once; calls in flight finish."""
    srv = start_server(tmp_path, "--frontends", "2", "--guest", f"sha256={example('sha256')}", "--grace", "20",
                       store=store)
    helpers = descendants(srv.pid)
    rundir = run_dir(srv)
    fes = [p for p, comm in helpers.items() if comm.startswith("hlpool-fe-")]
    start = time.monotonic()
    assert srv.call("sha256", "digest_rounds", b"seed", 100_000)[0] == 200
    rounds = max(10_000, min(50_000_000, int(100_000 * 0.8 / max(time.monotonic() - start, 1e-3))))
    results: list = []

    def client() -> None:
        try:
            results.append(srv.call("sha256", "digest_rounds", b"seed", rounds)[0])
        except Exception as exc:  # noqa: BLE001 (checked below)
            results.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    # in flight in both front ends: the gauge is their sum
    wait_for(lambda: re.search(r"^hlpool_calls_in_flight 6\.0$", srv.metrics(), re.M), 20, "the calls did not start")
    srv.proc.send_signal(signal.SIGTERM)
    if to_every_process:
        for pid in descendants(srv.pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for t in threads:
        t.join(60)
    assert results == [200] * 6, results
    helpers.update({p: c for p, c in descendants(srv.pid).items()})
    assert_stopped_cleanly(srv, helpers, sig=None, exit_timeout=60)
    assert shm_of(fes) == []
    assert not rundir.exists()


def _long_calls(srv, count: int, seconds: float) -> tuple[list, list[threading.Thread]]:
    """``count`` sha256 calls of about ``seconds`` each, started in threads (results appended)."""
    start = time.monotonic()
    assert srv.call("sha256", "digest_rounds", b"seed", 100_000)[0] == 200
    rounds = max(10_000, min(200_000_000, int(100_000 * seconds / max(time.monotonic() - start, 1e-3))))
    results: list = []

    def client() -> None:
        try:
            results.append(srv.call("sha256", "digest_rounds", b"seed", rounds)[0])
        except Exception as exc:  # noqa: BLE001 (checked by the caller)
            results.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(count)]
    for t in threads:
        t.start()
    wait_for(lambda: re.search(rf"^hlpool_calls_in_flight {count}\.0$", srv.metrics(), re.M), 20,
             "the calls did not start")
    return results, threads


def test_a_front_end_takes_a_late_duplicate_stop_as_the_same_stop(kvm, tmp_path, store, example):
    """systemd's default signals every process of the service; the supervisor forwards its own signal
    too, so each front end gets the stop twice, here 1.5 s apart (past the single server's 1 s
    window for duplicates): calls in flight still finish and every process exits 0."""
    srv = start_server(tmp_path, "--frontends", "2", "--guest", f"sha256={example('sha256')}", "--grace", "30",
                       store=store)
    helpers = descendants(srv.pid)
    fes = list(frontends(srv))
    results, threads = _long_calls(srv, 2, 2.5)  # one worker per front end: up to 5 s of draining
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(1.5)
    signalled = 0
    for pid in fes:  # a front end without calls may have finished already
        try:
            os.kill(pid, signal.SIGTERM)
            signalled += 1
        except ProcessLookupError:
            pass
    assert signalled >= 1  # one still drains its calls (2.5 s each)
    for t in threads:
        t.join(60)
    assert results == [200, 200], results
    helpers.update(descendants(srv.pid))
    assert_stopped_cleanly(srv, helpers, sig=None, exit_timeout=60)
    assert "exiting now" not in srv.log()


def test_a_second_signal_to_the_supervisor_ends_the_front_ends_at_once(kvm, tmp_path, store, example):
    srv = start_server(tmp_path, "--frontends", "2", "--guest", f"sha256={example('sha256')}", "--grace", "60",
                       store=store)
    helpers = descendants(srv.pid)
    rundir = run_dir(srv)
    fes = list(frontends(srv))
    results, threads = _long_calls(srv, 2, 20.0)
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(1.5)  # draining: the calls run on
    start = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    code = srv.stop(None, timeout=20)
    assert time.monotonic() - start < 10  # not the 20 s calls, not the 60 s grace
    assert code != 0  # its front ends did not finish their work
    assert "stopping the front ends now" in srv.log()
    for t in threads:
        t.join(30)
    assert len(results) == 2 and 200 not in results, results  # the calls were cut off
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in helpers):
        time.sleep(0.05)
    assert not [p for p in helpers if alive(p)], helpers
    assert shm_of(fes) == [] and shm_names_of(srv.pid) == []
    assert not rundir.exists()


def test_sigkill_of_the_main_process_takes_the_frontends_down(kvm, tmp_path, store):
    srv = start_server(tmp_path, "--frontends", "2", "--guest", "echo=" + str(_echo()), store=store)
    helpers = descendants(srv.pid)
    rundir = run_dir(srv)
    fes = [p for p, comm in helpers.items() if comm.startswith("hlpool-fe-")]
    assert len(fes) == 2 and len(helpers) == 6, helpers
    srv.proc.kill()
    srv.proc.wait(10)
    wait_for(lambda: not any(alive(p) for p in helpers), 30, f"processes left behind: {helpers}")
    assert shm_of(fes) == []
    wait_for(lambda: not rundir.exists(), 5, "the run directory was left behind")


def _echo() -> Path:
    from hlpool.guest.examples import example_path

    return example_path("echo")


def test_a_frontend_that_cannot_start_stops_the_server(kvm, tmp_path, store):
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"not an ELF file")
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.run([*HLPOOL, "serve", "--workers", "2", "--frontends", "2", "--port", "0",
                               "--snapshot-dir", str(store), "--guest", f"bad={bad}"], stdout=out,
                              stderr=subprocess.STDOUT, env=CLEAN_ENV, timeout=120)
    text = log.read_text()
    assert proc.returncode == 1, text
    assert "front end 0: " in text and "not an ELF file" in text and "Traceback" not in text, text
    match = re.search(r"run directory (\S+)", text)
    assert match and not os.path.exists(match.group(1))
