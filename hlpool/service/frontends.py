"""``hlpool serve --frontends K``: K HTTP front-end processes on one port, each with its own pool.

One Python process spends more CPU per request on HTTP (parsing, routing,
JSON, the event loop) than a worker spends running the call, so one front end
caps a server at what one core can parse. With K > 1 the ``hlpool serve``
process becomes a small supervisor:

- it makes a private run directory (``hlpool-serve-*`` in the temporary
  directory): the shared snapshot names (:mod:`.names`), the Prometheus
  multiprocess files and each front end's published pool state;
- it binds the port (``--port 0``: the kernel picks it) with ``SO_REUSEPORT``
  without listening, so that the port stays the server's, and forks the
  front ends; each binds its own listening socket to that port with
  ``SO_REUSEPORT`` (the kernel spreads new connections over them), creates
  its own :class:`~hlpool.Pool` with its share of the ``--workers``
  (N split as evenly as possible, at least one each) and serves the usual
  application (:mod:`.app`). The first front end builds the ``--guest``
  snapshots (into the shared, content-addressed store) and publishes their
  names before the others start, so they open them instead of building;
- a front end that dies is replaced (same index and share of workers; it
  takes the current names from the table); SIGTERM or SIGINT is forwarded as
  SIGTERM, every front end drains as a single server does (:mod:`.serve`),
  and the supervisor exits 0 once all have exited 0, removing the run
  directory. A front end takes any number of stop signals as one (with
  systemd's default it gets each twice, from systemd and from the supervisor,
  at any interval); a second signal to the supervisor kills the front ends at
  once (SIGKILL; their workers die with them).

The front ends run in their own process group (Ctrl-C reaches only the
supervisor, which forwards it once) and get SIGTERM when the supervisor dies
(``PR_SET_PDEATHSIG``): killed with SIGKILL, the supervisor leaves front ends
that drain, stop their pools and remove the run directory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, NoReturn

import prctl

from hlpool.errors import HlpoolError
from hlpool.guest.examples import EXAMPLE_HOST_FUNCTIONS, EXAMPLES, example_path
from hlpool.pool.supervisor import Pool
from hlpool.service.config import ServerConfig, check_config, check_port_free, frontend_count
from hlpool.service.handlers import Service
from hlpool.service.metrics import InFlightSlots, Metrics, SharedPoolStats
from hlpool.service.names import NameTable, create_table
from hlpool.service.serve import _raise_stop, _run, _Stop, _stop_pool, disable_created_metrics, run_loop, serve
from hlpool.version import __version__

log = logging.getLogger("hlpool.server")

_SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT)
START_TIMEOUT = 600.0  # building the guests of a first start can take minutes
RESTART_DELAY = 1.0  # a front end that died within MIN_LIFETIME of its start is replaced after this long
MIN_LIFETIME = 5.0


@dataclass
class FrontEnd:
    """One front-end slot: its index, share of workers, first worker's global index and process."""

    index: int
    workers: int
    offset: int
    pid: int = 0
    ready_fd: int = -1  # read end of the pipe it reports "listening" on (-1: reported, or not started)
    started: float = 0.0


def split_workers(workers: int, frontends: int) -> list[int]:
    """``workers`` over ``frontends`` as evenly as possible (the first ones get one more)."""
    base, extra = divmod(workers, frontends)
    return [base + (1 if i < extra else 0) for i in range(frontends)]


def run_server(config: ServerConfig) -> int:
    """``hlpool serve``: one process (:func:`~hlpool.service.serve.serve`) or, with more than one front end
    (:func:`~hlpool.service.config.frontend_count`), a supervisor of front ends; returns the exit status."""
    if frontend_count(config) > 1:
        return serve_frontends(config)
    return serve(config)


def serve_frontends(config: ServerConfig) -> int:
    """Supervise ``frontend_count(config)`` front ends until SIGTERM/SIGINT; returns the exit status."""
    check_config(config)
    check_port_free(config.host, config.port)
    count = frontend_count(config)
    shares = split_workers(config.workers, count)
    slots = [FrontEnd(i, n, sum(shares[:i])) for i, n in enumerate(shares)]
    rundir = tempfile.mkdtemp(prefix="hlpool-serve-")
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    reserved = None
    try:
        create_table(rundir)
        for sub in ("metrics", "pools"):
            os.mkdir(os.path.join(rundir, sub), 0o700)
        InFlightSlots.create(os.path.join(rundir, "inflight"), count)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(rundir, "metrics")  # inherited by the front ends
        reserved = _reserve_port(config.host, config.port)
        port = reserved.getsockname()[1]
        log.info("%d front ends, %s worker(s) each; run directory %s", count, "/".join(map(str, shares)), rundir)
        return _Supervisor(config, slots, rundir, port, reserved).run()
    finally:
        if reserved is not None:
            reserved.close()
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(rundir, ignore_errors=True)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)


def _addrinfo(host: str, port: int) -> tuple[int, Any]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise HlpoolError(f"cannot listen on {host}:{port}: {exc}") from None
    family, _, _, _, address = infos[0]
    return family, address


def _reuseport_socket(host: str, port: int) -> socket.socket:
    family, address = _addrinfo(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise HlpoolError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def _reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening: it gets no connections) to the server's port, which it keeps."""
    return _reuseport_socket(host, port)


class _Supervisor:
    def __init__(self, config: ServerConfig, slots: list[FrontEnd], rundir: str, port: int,
                 reserved: socket.socket) -> None:
        self.reserved = reserved
        self.config = config
        self.slots = slots
        self.rundir = rundir
        self.port = port
        self.stopping = False
        self.failed = False  # a front end exited with a non-zero status while stopping
        self.first = True  # the next front end started is the very first: it builds and names the guests
        self.serving = False  # every front end started once

    # ---- starting ------------------------------------------------------------------------

    def _start(self, slot: FrontEnd) -> None:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        load_guests, self.first = self.first, False
        parent = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the front end: keeps none of the supervisor's descriptors but its own pipe's end
            os.close(read_fd)
            self.reserved.close()
            for other in self.slots:
                if other.ready_fd >= 0:
                    os.close(other.ready_fd)
            _frontend_main(self.config, slot, self.rundir, self.port, write_fd, parent, load_guests)
        os.close(write_fd)
        slot.pid, slot.ready_fd, slot.started = pid, read_fd, time.monotonic()
        log.debug("front end %d: pid %d, %d worker(s)", slot.index, pid, slot.workers)

    def _wait_ready(self, slots: list[FrontEnd], timeout: float) -> bool:
        """Wait until every slot reported it listens; False if a signal or a death came first."""
        deadline = time.monotonic() + timeout
        while any(s.ready_fd >= 0 for s in slots):
            fds = [s.ready_fd for s in slots if s.ready_fd >= 0]
            readable, _, _ = select.select(fds, [], [], 0.1)
            for slot in slots:
                if slot.ready_fd in readable:
                    ok = os.read(slot.ready_fd, 1) == b"R"
                    os.close(slot.ready_fd)
                    slot.ready_fd = -1
                    if not ok:
                        return False  # it exited (the pipe closed) before listening
            info = signal.sigtimedwait(_SIGNALS, 0)
            if info is not None:
                if info.si_signo != signal.SIGCHLD:
                    self._stop(info.si_signo)
                    return False
                self._reap()
                if self.stopping:
                    return False
            if time.monotonic() > deadline:
                log.error("the front ends did not start within %g s", timeout)
                return False
        return True

    def run(self) -> int:
        self._start(self.slots[0])  # it builds the guests into the store; the others then only open them
        ok = self._wait_ready(self.slots[:1], START_TIMEOUT)
        if ok:
            for slot in self.slots[1:]:
                self._start(slot)
            ok = self._wait_ready(self.slots[1:], START_TIMEOUT)
        if ok:
            host = self.config.host
            url = f"http://{host if ':' not in host else f'[{host}]'}:{self.port}"
            names = ", ".join(sorted(NameTable.names_in(self.rundir)))
            log.info("hlpool %s listening on %s with %d workers in %d front ends%s; serving %s", __version__,
                     url, self.config.workers, len(self.slots), "" if self.config.token else " (no token)", names)
            self.serving = True
        elif not self.stopping:  # a front end failed to start, or the start timed out
            self.failed = True
            self._stop(signal.SIGTERM)
        while any(s.pid for s in self.slots):
            info = signal.sigtimedwait(_SIGNALS, 60.0)
            if info is None:
                continue
            if info.si_signo == signal.SIGCHLD:
                self._reap()
            else:
                self._stop(info.si_signo)
        log.info("stopped")
        return 1 if self.failed else 0

    # ---- front ends that exit ---------------------------------------------------------------

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            _mark_dead(pid)
            InFlightSlots.clear(os.path.join(self.rundir, "inflight"), slot.index)
            try:  # its published pool state is stale: its workers died with it
                os.unlink(os.path.join(self.rundir, "pools", f"{slot.index}.json"))
            except FileNotFoundError:
                pass
            slot.pid = 0
            if slot.ready_fd >= 0:
                os.close(slot.ready_fd)
                slot.ready_fd = -1
            code = os.waitstatus_to_exitcode(status)
            if not self.serving and not self.stopping:  # it could not start: the server cannot either
                log.error("front end %d (pid %d) exited while starting (status %d)", slot.index, pid, code)
                self.failed = True
                self._stop(signal.SIGTERM)
                continue
            if self.stopping:
                if code != 0:
                    log.warning("front end %d (pid %d) exited with status %d", slot.index, pid, code)
                    self.failed = True
                continue
            log.warning("front end %d (pid %d) %s; starting another", slot.index, pid,
                        f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}")
            if time.monotonic() - slot.started < MIN_LIFETIME:
                time.sleep(RESTART_DELAY)  # do not spin on a front end that cannot start
            self._start(slot)
            os.close(slot.ready_fd)  # it serves once it listens; nobody waits for that
            slot.ready_fd = -1

    def _stop(self, signum: int) -> None:
        # A front end takes any number of stop signals as one (it may get each twice: from here and
        # from whoever signalled every process of the service); a second signal here ends them now.
        now = self.stopping
        if now:
            log.warning("%s: stopping the front ends now", signal.Signals(signum).name)
        else:
            log.info("%s: shutting down (grace %g s)", signal.Signals(signum).name, self.config.grace)
        self.stopping = True
        for slot in self.slots:
            if slot.pid:
                try:
                    os.kill(slot.pid, signal.SIGKILL if now else signal.SIGTERM)
                except ProcessLookupError:
                    pass


def _mark_dead(pid: int) -> None:
    """Drop a dead front end's files of live gauges (prometheus_client's bookkeeping; none are used now)."""
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
    except OSError:
        pass


# ---- the front-end process -------------------------------------------------------------------------


def _frontend_main(config: ServerConfig, slot: FrontEnd, rundir: str, port: int, ready_fd: int, parent: int,
                   load_guests: bool) -> NoReturn:
    """The forked front end: serve until SIGTERM, then exit (never returns into the supervisor's code)."""
    code = 1
    try:
        prctl.set_pdeathsig(signal.SIGTERM)  # the supervisor died: drain and stop like on SIGTERM
        if os.getppid() != parent:
            os._exit(1)  # it died before PDEATHSIG was armed
        os.setpgid(0, 0)  # Ctrl-C reaches the supervisor only (it forwards SIGTERM once)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        prctl.set_name(f"hlpool-fe-{slot.index}")
        code = serve_frontend(config, slot, rundir, port, ready_fd, load_guests)
    except HlpoolError as exc:  # e.g. a --guest that does not build: one line, as the CLI prints it
        log.error("front end %d: %s", slot.index, exc)
    except BaseException:  # everything ends here: this process must not return into the supervisor
        log.exception("front end %d failed", slot.index)
    finally:
        try:
            if os.getppid() != parent:  # the supervisor is gone: the last front end out removes the run directory
                shutil.rmtree(rundir, ignore_errors=True)
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve_frontend(config: ServerConfig, slot: FrontEnd, rundir: str, port: int, ready_fd: int,
                   load_guests: bool) -> int:
    """One front end's life, as :func:`hlpool.service.serve.serve` for a single server: its pool, the
    shared names and metrics, its socket on the server's port; writes ``R`` to ``ready_fd`` once it listens."""
    if disable_created_metrics is not None:
        disable_created_metrics()
    sock = frontend_socket(config.host, port)
    guests = dict(config.guests) or {name: str(example_path(name)) for name in EXAMPLES}
    pool = Pool(slot.workers, snapshot_dir=config.snapshot_dir, host_functions=EXAMPLE_HOST_FUNCTIONS,
                max_pending=config.max_pending, call_timeout=config.call_timeout, block=False,
                build_timeout=config.build_timeout, build_memory=config.build_memory,
                max_guest_memory=config.max_guest_memory, store_quota=config.store_quota)
    names = NameTable(rundir)
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        metrics = Metrics(multiprocess_dir=os.environ["PROMETHEUS_MULTIPROC_DIR"])
        shared = SharedPoolStats(os.path.join(rundir, "pools"), slot.index, slot.offset, pool)
        service = Service(pool, config, metrics, names=names, shared=shared)
        service.frontend = str(os.getpid())
        service.in_flight_slots = InFlightSlots(os.path.join(rundir, "inflight"), slot.index)
        if load_guests:
            service.load(guests)  # builds them into the store and publishes their names
        else:
            service.snapshots.refresh()  # the names as they are now (opened from the store)
        publisher: list[asyncio.Task] = []

        def on_listening(url: str) -> None:
            log.info("front end %d (pid %d) serving on %s with %d worker(s)", slot.index, os.getpid(), url,
                     slot.workers)
            shared.publish()
            publisher.append(asyncio.get_running_loop().create_task(_publish(shared, service)))
            try:
                os.write(ready_fd, b"R")
                os.close(ready_fd)
            except OSError:  # a replacement: nobody waits for it
                pass

        run_loop(_run(service, sock, on_listening, repeat_signal_exits=False))
        service.metrics.flush()  # its last calls, into the files the other front ends still read
    except _Stop:
        log.info("front end %d stopped while starting", slot.index)
    finally:
        for sig in previous:  # a stop signal again (a duplicate): finish; the supervisor kills if it must
            signal.signal(sig, signal.SIG_IGN)
        _stop_pool(pool, deadline=time.monotonic() + 1.0)
        names.close()
        sock.close()
    return 0


async def _publish(shared: SharedPoolStats, service: Service, period: float = 1.0) -> None:
    """Publish this front end's pool state and add its tallied calls to the shared metrics files
    every ``period`` seconds (for the others' /metrics)."""
    while True:
        await asyncio.sleep(period)
        service.metrics.flush()
        shared.publish(service.shutting_down)


def frontend_socket(host: str, port: int) -> socket.socket:
    """A front end's own listening socket on the server's port (``SO_REUSEPORT``)."""
    sock = _reuseport_socket(host, port)
    sock.listen(1024)
    sock.setblocking(False)
    return sock
