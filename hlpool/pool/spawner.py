"""The spawner: a small process that forks workers on the supervisor's behalf.

The supervisor runs threads (one per worker, plus the caller's), and forking
a multi-threaded process copies whatever locks other threads held at that
instant. So the pool forks this spawner once, while it has no threads of its
own and no KVM state, and the spawner (single-threaded, idle between
requests) forks every worker, including replacements for workers that died.

It also forks the short-lived snapshot builders (:mod:`hlpool.pool.builder`): the
supervisor passes one end of a socketpair along with the request, and the builder
talks to the supervisor over it directly.

Process tree: supervisor -> spawner -> workers (and builders). Each child has
``PR_SET_PDEATHSIG=SIGKILL``, so killing the supervisor (even with SIGKILL)
takes the spawner and then every worker with it. The spawner ignores
SIGCHLD, so the kernel reaps workers; the supervisor watches each worker
with a pidfd.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import sys
import threading
import traceback

import msgspec
import prctl

from hlpool.errors import HlpoolError
from hlpool.pool import channel as ipc
from hlpool.pool.builder import builder_main
from hlpool.pool.store import close_inherited_pins
from hlpool.pool.worker import WorkerConfig, serve

log = logging.getLogger(__name__)


class Spawner:
    """Supervisor-side handle on the spawner process."""

    def __init__(self, config: WorkerConfig) -> None:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the spawner
            code = 1
            try:
                parent_sock.close()
                _spawner_main(child_sock, config)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)  # never run the supervisor's atexit handlers or finalizers here
        child_sock.close()
        self.pid = pid
        self._sock = parent_sock
        self.pidfd = os.pidfd_open(pid)
        self._lock = threading.Lock()  # one request/answer exchange at a time (builds come from any thread)

    def spawn(self, index: int, names: ipc.ChannelNames, notify_fd: int = -1) -> int:
        """Fork worker ``index`` attached to the channel ``names`` (and, if given, holding a copy of
        the eventfd ``notify_fd``, see :func:`hlpool.pool.worker.serve`); returns its pid."""
        request = msgspec.msgpack.encode({"index": index, "names": [names.shm, names.size, names.depth]})
        reply = self._exchange(request, [notify_fd] if notify_fd >= 0 else [])
        if "error" in reply:
            raise HlpoolError(f"cannot start worker {index}: {reply['error']}")
        return int(reply["pid"])

    def spawn_builder(self, fd: int) -> int:
        """Fork a snapshot builder that talks over the socket ``fd`` (passed to it); returns its pid."""
        reply = self._exchange(msgspec.msgpack.encode({"build": True}), [fd])
        if "error" in reply:
            raise HlpoolError(f"cannot start a snapshot builder: {reply['error']}")
        return int(reply["pid"])

    def _exchange(self, request: bytes, fds: list[int]) -> dict:
        with self._lock:
            try:
                socket.send_fds(self._sock, [request], fds)
                reply = msgspec.msgpack.decode(self._sock.recv(4096))
            except (OSError, msgspec.DecodeError) as exc:
                raise HlpoolError(f"the worker spawner is gone: {exc}") from None
        if not isinstance(reply, dict):
            raise HlpoolError("the worker spawner sent a malformed answer")
        return reply

    def alive(self) -> bool:
        try:
            return os.waitpid(self.pid, os.WNOHANG) == (0, 0)
        except ChildProcessError:
            return False

    def close(self, timeout: float = 5.0) -> None:
        """Stop the spawner (its workers die with it) and reap it."""
        try:
            self._sock.close()
        except OSError:
            pass
        ready, _, _ = select.select([self.pidfd], [], [], timeout)
        if not ready:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        os.close(self.pidfd)


def _close_inherited_vm_fds(keep: int) -> None:
    """Close KVM and snapshot-memory fds inherited from the supervisor.

    The supervisor may already own VMs (it boots guests to build snapshots) and
    in-memory layers; copies of those fds here would keep them alive after the
    supervisor releases them. Nothing in the spawner or a worker uses them:
    workers open /dev/kvm and snapshot files themselves.
    """
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2 or fd == keep:
            continue
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target == "/dev/kvm" or target.startswith("anon_inode:kvm") or target.startswith("/memfd:hlpool-"):
            try:
                os.close(fd)
            except OSError:
                pass


def _spawner_main(sock: socket.socket, config) -> None:
    _close_inherited_vm_fds(sock.fileno())
    close_inherited_pins()
    prctl.set_pdeathsig(signal.SIGKILL)
    if os.getppid() == 1:
        return
    prctl.set_name("hlpool-spawner")
    try:
        prctl.set_proctitle("hlpool-spawner")
    except Exception:
        pass
    # Ctrl-C and SIGTERM are the supervisor's business: a service manager that signals every
    # process of the service (systemd's default) must not end workers with calls in flight while
    # the supervisor drains. The supervisor ends this process; PDEATHSIG covers its death.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps workers
    while True:
        try:
            message, fds, _flags, _address = socket.recv_fds(sock, 4096, 1)
        except OSError:
            return
        if not message:
            return  # the supervisor closed its end: stop; workers follow through PDEATHSIG
        try:
            request = msgspec.msgpack.decode(message)
            if not isinstance(request, dict):
                raise ValueError("not a map")
        except Exception as exc:
            for fd in fds:
                os.close(fd)
            sock.send(msgspec.msgpack.encode({"error": f"malformed request: {exc}"}))
            continue
        if request.get("build"):
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                sock.send(msgspec.msgpack.encode({"error": "a build request carries exactly one socket"}))
                continue
            _fork_builder(sock, fds[0], config)
            continue
        notify_fd = fds[0] if fds else -1
        try:
            shm, size, depth = request["names"]
            channel = ipc.Channel.attach(ipc.ChannelNames(shm, size, depth))
        except Exception as exc:
            if notify_fd >= 0:
                os.close(notify_fd)
            sock.send(msgspec.msgpack.encode({"error": f"{type(exc).__name__}: {exc}"}))
            continue
        pid = os.fork()
        if pid == 0:  # a worker
            code = 1
            try:
                sock.close()
                serve(int(request["index"]), channel, config, notify_fd)
                code = 0
            except BaseException:
                traceback.print_exc(file=sys.stderr)
            finally:
                os._exit(code)
        channel.close()
        if notify_fd >= 0:
            os.close(notify_fd)  # the worker has its copy; later workers must not inherit this one
        sock.send(msgspec.msgpack.encode({"pid": pid}))


def _fork_builder(sock: socket.socket, fd: int, config) -> None:
    """Fork a builder with the socket ``fd`` (see :mod:`hlpool.pool.builder`) and answer with its pid."""
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(fd)
        sock.send(msgspec.msgpack.encode({"error": f"fork: {exc.strerror}"}))
        return
    if pid == 0:  # the builder
        code = 1
        try:
            sock.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            builder_main(fd, config)
            code = 0
        except BaseException:
            traceback.print_exc(file=sys.stderr)
        finally:
            os._exit(code)
    os.close(fd)
    sock.send(msgspec.msgpack.encode({"pid": pid}))
