"""``hlpool serve``: the server process's life: start the pool, serve until a signal, drain, stop.

One process: an aiohttp server on an asyncio event loop in the main thread,
and a :class:`~hlpool.Pool` (its spawner and worker processes) created before
the loop starts. SIGTERM/SIGINT stop accepting connections, let requests in
flight finish within ``--grace`` seconds, stop the pool and exit 0; a second
signal exits at once (workers die with the supervisor, no shared-memory names
outlive it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
from typing import Any, Callable

from aiohttp import web

from hlpool.errors import HlpoolError
from hlpool.guest.examples import EXAMPLE_HOST_FUNCTIONS, EXAMPLES, example_path
from hlpool.pool.supervisor import Pool
from hlpool.service.app import make_app, server_options
from hlpool.service.fastlane import FastLane, FastLaneSite
from hlpool.service.config import ServerConfig, check_config, check_port_free
from hlpool.service.handlers import Service
from hlpool.version import __version__

try:
    from prometheus_client import disable_created_metrics
except ImportError:  # prometheus_client before 0.17
    disable_created_metrics = None

log = logging.getLogger("hlpool.server")

DUPLICATE_SIGNAL_WINDOW = 1.0  # seconds after a stop signal within which another one is the same stop


class _Stop(BaseException):
    """A signal arrived while the server was starting."""


def serve(config: ServerConfig, ray_address: str | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit status. With ``ray_address`` the pool is a
    :class:`~hlpool.ray.RayPool` on that Ray cluster (``config.workers`` workers per node)."""
    check_config(config)
    check_port_free(config.host, config.port)
    if disable_created_metrics is not None:
        disable_created_metrics()  # this process is the server: no *_created series next to every counter
    guests = dict(config.guests) or {name: str(example_path(name)) for name in EXAMPLES}
    # The pool forks its spawner now, before the event loop, its signal handling and any thread exist.
    if ray_address:  # `hlpool serve --ray ADDRESS`: one hlpool Pool per Ray node, in an actor there
        from hlpool.ray.raypool import RayPool

        pool = RayPool(ray_address, workers_per_node=config.workers, snapshot_dir=config.snapshot_dir,
                       host_functions=EXAMPLE_HOST_FUNCTIONS, max_pending=config.max_pending,
                       call_timeout=config.call_timeout, block=False,
                       pool_options={"build_timeout": config.build_timeout, "build_memory": config.build_memory,
                                     "max_guest_memory": config.max_guest_memory, "store_quota": config.store_quota})
    else:
        pool = Pool(config.workers, snapshot_dir=config.snapshot_dir, host_functions=EXAMPLE_HOST_FUNCTIONS,
                    max_pending=config.max_pending, call_timeout=config.call_timeout, block=False,
                    build_timeout=config.build_timeout, build_memory=config.build_memory,
                    max_guest_memory=config.max_guest_memory, store_quota=config.store_quota)
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        service = Service(pool, config)
        service.load(guests)
        run_loop(_run(service))
    except _Stop:
        log.info("stopped while starting")
    finally:
        for sig in previous:
            signal.signal(sig, _force_exit)
        _stop_pool(pool, deadline=time.monotonic() + 1.0)  # calls still running now have no client
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped")
    return 0


def run_loop(main: Any) -> Any:
    """``asyncio.run(main)``, on uvloop's event loop where it is installed (it is a dependency): its
    transports, timers and thread wake-ups cost less CPU per request (docs/frontends.md has the numbers)."""
    if os.environ.get("HLPOOL_EVENT_LOOP") != "asyncio":  # the standard loop, for comparison or debugging
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop()


async def _run(service: Service, sock: socket.socket | None = None,
               on_listening: Callable[[str], None] | None = None, repeat_signal_exits: bool = True) -> None:
    """Serve until a signal, then drain. ``sock``: a listening socket to serve (a front end's), and
    ``on_listening(url)`` called instead of logging the "listening on" line. ``repeat_signal_exits``:
    a second signal (not a duplicate of the first) exits at once; a front end passes False (it may get
    each stop twice, from its supervisor and from whoever signalled every process, at any interval:
    its supervisor ends it with SIGKILL on a second signal of its own)."""
    config = service.config
    app = make_app(service)
    # Calls are drained by Service.drain(); the runner's own timeout bounds the other requests (registrations).
    access_log = None
    if config.access_log:
        access_log = logging.getLogger("aiohttp.access")
        access_log.setLevel(logging.INFO)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=min(config.grace, 2.0), access_log=access_log,
                           **server_options(config))  # header timeout, body lingering, quiet client errors
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    first_signal = [0.0]

    def on_signal(signum: int) -> None:
        if stop.is_set():
            # The same stop twice, e.g. systemd signalling every process of the service while the
            # front ends' supervisor forwards its own signal: only a later one means "exit now".
            if not repeat_signal_exits or time.monotonic() - first_signal[0] < DUPLICATE_SIGNAL_WINDOW:
                return
            _force_exit(signum, None)
        log.info("%s: shutting down (grace %g s)", signal.Signals(signum).name, config.grace)
        first_signal[0] = time.monotonic()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    lane = None
    try:
        lane = FastLane(service, runner.server) if config.fast_lane and not config.access_log else None
        if lane is not None:
            site: web.BaseSite = FastLaneSite(runner, lane, sock=sock, host=config.host, port=config.port)
        else:
            site = web.TCPSite(runner, config.host, config.port, reuse_address=True) if sock is None else \
                web.SockSite(runner, sock)
        try:
            await site.start()
        except OSError as exc:
            raise HlpoolError(f"cannot listen on {config.host}:{config.port}: {exc.strerror}") from None
        host, port = runner.addresses[0][:2]
        url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        if on_listening is not None:
            on_listening(url)
        else:
            log.info("hlpool %s listening on %s with %d workers%s; serving %s", __version__, url, config.workers,
                     "" if config.token else " (no token)", ", ".join(service.entries))
        await stop.wait()
        service.shutting_down = True
        for s in list(runner.sites):
            await s.stop()  # no new connections
        log.info("stopped accepting; waiting for %d call(s) in flight", service.in_flight)
        await service.drain(config.grace)
    finally:
        service.shutting_down = True
        if lane is not None:
            lane.close()  # idle fast-lane connections (aiohttp's are closed by the runner)
        # Stop listening (if not yet), close idle connections, wait briefly for other requests, cancel the rest.
        await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _force_exit)  # from here on, a (second) signal means: exit now


def _force_exit(signum: int, frame: Any) -> None:
    log.warning("%s: exiting now", signal.Signals(signum).name)
    logging.shutdown()
    os._exit(1)  # the workers die with this process (PDEATHSIG) and no IPC names exist to leak


def _stop_pool(pool: Any, deadline: float) -> None:
    """Shut the pool down; calls still running past ``deadline`` are ended by killing their workers."""
    done = threading.Event()

    def shutdown() -> None:
        try:
            pool.shutdown(wait=True, cancel_futures=True)
        finally:
            done.set()

    threading.Thread(target=shutdown, name="hlpool-server-shutdown", daemon=True).start()
    if not done.wait(max(0.0, deadline - time.monotonic())):
        busy = [s for s in pool.stats() if s["alive"] and s["in_flight"] and s["pid"] > 0]  # RayPool: pid 0
        log.warning("%d worker(s) still running calls; stopping them", len(busy))
        for s in busy:
            try:
                os.kill(s["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not done.wait(15.0):
            log.error("the pool did not stop")
