"""Confined workers (hlpool/pool/confine.py): attacks from a host function fail, work goes on.

Each attack is a host function the ``hostcall`` guest calls through ``ask``; it
returns ``{"ok": bool, "detail": str}`` instead of raising, so the test sees what
happened inside the worker. Every attack runs against an unconfined pool too,
where it must succeed: that is what shows the attack is real and that it is the
confinement that stops it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from hlpool import GuestTimeout, HostFunctionError, Pool
from hlpool.pool import confine

pytestmark = pytest.mark.kvm

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]

SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207


# ---- the attacks (host functions: they run inside a worker) ------------------------------------


def _sibling(pids: list) -> int:
    return next(p for p in pids if p != os.getpid())


def _failed(what: str, exc: BaseException | int) -> dict:
    if isinstance(exc, int):
        return {"ok": False, "detail": f"{what}: {errno.errorcode.get(exc, exc)} {os.strerror(exc)}"}
    return {"ok": False, "detail": f"{what}: {type(exc).__name__}: {exc}"}


def read_sibling_memory(pids: list) -> dict:
    """Read a sibling worker's memory through /proc/PID/mem. Workers are forked from one spawner,
    so the address of None is the same in the sibling."""
    try:
        with open(f"/proc/{_sibling(pids)}/mem", "rb", buffering=0) as mem:
            mem.seek(id(None))
            return {"ok": True, "detail": f"read {len(mem.read(16))} bytes of the sibling's memory"}
    except OSError as exc:
        return _failed("/proc/PID/mem", exc)


def read_sibling_memory_vm(pids: list) -> dict:
    """The same with process_vm_readv(2)."""
    buf = ctypes.create_string_buffer(16)
    local = (ctypes.c_void_p * 2)(ctypes.cast(buf, ctypes.c_void_p), 16)
    remote = (ctypes.c_void_p * 2)(id(None), 16)
    n = _libc.syscall(310, _sibling(pids), local, 1, remote, 1, 0)  # process_vm_readv
    if n < 0:
        return _failed("process_vm_readv", ctypes.get_errno())
    return {"ok": True, "detail": f"read {n} bytes of the sibling's memory"}


def steal_sibling_fd(pids: list) -> dict:
    """pidfd_open(2) + pidfd_getfd(2): take the sibling's kvm-vm fd (or any fd it holds)."""
    sibling = _sibling(pids)
    pidfd = _libc.syscall(SYS_PIDFD_OPEN, sibling, 0)
    if pidfd < 0:
        return _failed("pidfd_open", ctypes.get_errno())
    try:
        taken = {}
        for fd in range(3, 64):
            got = _libc.syscall(SYS_PIDFD_GETFD, ctypes.c_int(pidfd), fd, 0)
            if got < 0:
                error = ctypes.get_errno()
                if error == errno.EBADF:
                    continue
                return _failed("pidfd_getfd", error)
            taken[fd] = os.readlink(f"/proc/self/fd/{got}")
            os.close(got)
        if not taken:
            return {"ok": False, "detail": "pidfd_getfd: the sibling has no fds in 3..63"}
        return {"ok": True, "detail": f"took the sibling's fds {taken}"}
    finally:
        os.close(pidfd)


def read_supervisor_environ(supervisor: int) -> dict:
    try:
        with open(f"/proc/{supervisor}/environ", "rb") as f:
            data = f.read()
        return {"ok": True, "detail": f"read {len(data)} bytes of the supervisor's environment"}
    except OSError as exc:
        return _failed("/proc/PID/environ", exc)


def signal_supervisor(supervisor: int) -> dict:
    try:
        os.kill(supervisor, 0)  # signal 0: the permission check only
        return {"ok": True, "detail": "may signal the supervisor"}
    except OSError as exc:
        return _failed("kill", exc)


def write_snapshot_dir(directory: str, existing: str) -> dict:
    """Plant a file in the snapshot store, and open a stored (0444) snapshot for writing."""
    planted = os.path.join(directory, "planted.hlsnap")
    done = []
    try:
        with open(planted, "wb") as f:
            f.write(b"not a snapshot")
        os.unlink(planted)
        done.append("planted a file")
        with open(existing, "r+b"):
            pass  # opened for writing; nothing written
        done.append("opened a stored snapshot for writing")
        return {"ok": True, "detail": "; ".join(done)}
    except OSError as exc:
        return _failed("; ".join(done + ["write"]), exc)


def run_program() -> dict:
    """execve(2) a program: in a forked child if a process can be created, else in the worker
    itself (where it must fail, or the worker is gone)."""
    r, w = os.pipe()
    try:
        pid = os.fork()
    except OSError as fork_error:
        os.close(r)
        os.close(w)
        try:
            os.execv("/bin/echo", ["echo", "executed"])
        except OSError as exc:
            return _failed(f"fork: {fork_error}; execve", exc)
    if pid == 0:
        try:
            os.dup2(w, 1)
            os.execv("/bin/echo", ["echo", "executed"])
        finally:
            os._exit(127)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read().strip()
    return {"ok": out == "executed", "detail": f"a child ran /bin/echo: {out!r}"}


def trace_sibling(pids: list) -> dict:
    """ptrace(2) a sibling worker (seize, stop, detach: it carries on)."""
    sibling = _sibling(pids)
    if _libc.ptrace(PTRACE_SEIZE, sibling, None, None) != 0:
        return _failed("ptrace", ctypes.get_errno())
    try:
        _libc.ptrace(PTRACE_INTERRUPT, sibling, None, None)
        os.waitpid(sibling, os.WALL if hasattr(os, "WALL") else 0x40000000)
    finally:
        _libc.ptrace(PTRACE_DETACH, sibling, None, None)
    return {"ok": True, "detail": "stopped the sibling under ptrace, then let it go"}


# System calls the filter must deny, each with arguments that make it harmless where it is allowed
# (a no-op or an error other than EPERM): (name, number, args)
DENIED_PROBES = (
    ("ptrace", 101, (-1, 0, 0, 0)),  # an unknown request: EIO
    ("process_vm_readv", 310, (0, 0, 0, 0, 0, 0)),  # no iovecs: 0
    ("process_vm_writev", 311, (0, 0, 0, 0, 0, 0)),
    ("pidfd_open", SYS_PIDFD_OPEN, ("self", 0)),  # a pidfd on itself (closed again)
    ("pidfd_getfd", SYS_PIDFD_GETFD, (-1, 0, 0)),  # EBADF
    ("kcmp", 312, ("self", "self", 0, 0, 0)),  # KCMP_FILE, fd 0 with itself: 0
    ("bpf", 321, (-1, 0, 0)),  # an unknown command: EINVAL
    ("perf_event_open", 298, (0, 0, -1, -1, 0)),  # no attributes: EFAULT
    ("mount", 165, (0, 0, 0, 0, 0)),  # EFAULT
    ("unshare", 272, (0,)),  # nothing to unshare: 0
    ("setns", 308, (-1, 0)),  # EBADF
    ("keyctl", 250, (-1, 0, 0, 0, 0)),  # an unknown operation: EOPNOTSUPP
    ("execve", 59, (0, 0, 0)),  # EFAULT
)


def probe_denied() -> dict:
    """Make each call of DENIED_PROBES; name -> errno name ("" when it succeeded)."""
    out = {}
    for name, number, args in DENIED_PROBES:
        args = tuple(ctypes.c_long(os.getpid() if a == "self" else a) for a in args)
        ret = _libc.syscall(number, *args)
        if ret >= 0:
            out[name] = ""
            if name == "pidfd_open":
                os.close(ret)
        else:
            out[name] = errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))
    return out


def worker_state() -> dict:
    import prctl

    pdeathsig = prctl.get_pdeathsig()
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return {"pid": os.getpid(), "dumpable": bool(prctl.get_dumpable()), "pdeathsig": pdeathsig,
            "fds": {str(k): v for k, v in fds.items()}}


def set_dumpable_again() -> dict:
    import prctl

    try:
        prctl.set_dumpable(True)
        return {"ok": True, "detail": "dumpable again"}
    except OSError as exc:
        return _failed("PR_SET_DUMPABLE", exc)


def make_directory(path: str) -> None:
    os.mkdir(path)  # raises: the call fails with a HostFunctionError


def in_a_thread(x: int) -> int:
    out = []
    t = threading.Thread(target=lambda: out.append(x * 2))
    t.start()
    t.join()
    return out[0]


def sleep_then(x: int) -> int:
    time.sleep(0.01)
    return x


ATTACKS = {"read_sibling_memory": read_sibling_memory, "read_sibling_memory_vm": read_sibling_memory_vm,
           "steal_sibling_fd": steal_sibling_fd, "read_supervisor_environ": read_supervisor_environ,
           "signal_supervisor": signal_supervisor, "write_snapshot_dir": write_snapshot_dir,
           "run_program": run_program, "trace_sibling": trace_sibling}
HOST = {**ATTACKS, "probe_denied": probe_denied, "worker_state": worker_state,
        "set_dumpable_again": set_dumpable_again, "make_directory": make_directory, "in_a_thread": in_a_thread,
        "sleep_then": sleep_then, "value": lambda i: i * 3}


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def leaked_fds():
    """fds the supervisor holds when the pool starts (a socket, a file open for writing): workers
    must not keep them."""
    a, b = socket.socketpair()
    f = tempfile.TemporaryFile()
    yield {"socket": a.fileno(), "file": f.fileno()}
    a.close()
    b.close()
    f.close()


@pytest.fixture(scope="module", params=[True, False], ids=["confined", "unconfined"])
def pool(request, kvm, tmp_path_factory, leaked_fds):
    with Pool(workers=2, snapshot_dir=tmp_path_factory.mktemp("store"), host_functions=HOST, call_timeout=10,
              confine_workers=request.param) as p:
        p.confined = request.param
        yield p


@pytest.fixture(scope="module")
def hostcall(pool, example):
    return pool.snapshot(example("hostcall"))


def ask(pool, snapshot, name, *args, timeout=10):
    return pool.submit(snapshot, "ask", (name, *args)).result(timeout=timeout)


def busy_workers(pool, snapshot):
    """Give both workers a VM (so a sibling has a kvm-vm fd) and return their pids."""
    futures = [pool.submit(snapshot, "ask", ("sleep_then", i)) for i in range(8)]
    for f in futures:
        f.result(timeout=10)
    return [s["pid"] for s in pool.stats()]


# ---- the attacks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("attack", ["read_sibling_memory", "read_sibling_memory_vm", "steal_sibling_fd",
                                    "trace_sibling"])
def test_a_worker_cannot_reach_into_a_sibling(pool, hostcall, attack):
    pids = busy_workers(pool, hostcall)
    outcome = ask(pool, hostcall, attack, pids)
    print(f"{'confined' if pool.confined else 'unconfined'} {attack}: {outcome}")
    assert outcome["ok"] is (not pool.confined), outcome
    assert ask(pool, hostcall, "value", 5) == 15  # both workers still serve
    assert all(s["alive"] for s in pool.stats())


@pytest.mark.parametrize("attack", ["read_supervisor_environ", "signal_supervisor"])
def test_a_worker_cannot_reach_the_supervisor(pool, hostcall, attack):
    outcome = ask(pool, hostcall, attack, os.getpid())
    print(f"{'confined' if pool.confined else 'unconfined'} {attack}: {outcome}")
    assert outcome["ok"] is (not pool.confined), outcome


def test_a_worker_cannot_write_the_snapshot_store(pool, hostcall):
    outcome = ask(pool, hostcall, "write_snapshot_dir", str(pool.snapshot_dir), hostcall.path)
    print(f"{'confined' if pool.confined else 'unconfined'} write_snapshot_dir: {outcome}")
    assert outcome["ok"] is (not pool.confined), outcome
    assert not os.path.exists(pool.snapshot_dir / "planted.hlsnap")


def test_a_worker_cannot_run_a_program(pool, hostcall):
    outcome = ask(pool, hostcall, "run_program")
    print(f"{'confined' if pool.confined else 'unconfined'} run_program: {outcome}")
    assert outcome["ok"] is (not pool.confined), outcome
    assert ask(pool, hostcall, "value", 2) == 6


def test_the_filter_denies_the_dangerous_calls(pool, hostcall):
    outcome = ask(pool, hostcall, "probe_denied")
    print(f"{'confined' if pool.confined else 'unconfined'} probe_denied: {outcome}")
    assert set(outcome) == {name for name, _, _ in DENIED_PROBES}
    if pool.confined:
        assert all(e == "EPERM" for e in outcome.values()), outcome
    else:
        assert not [name for name, e in outcome.items() if e == "EPERM"], outcome


# ---- the confined state --------------------------------------------------------------------------


def test_workers_are_confined(pool, hostcall, leaked_fds):
    pids = busy_workers(pool, hostcall)
    for pid in pids:
        status = confine.process_status(pid)
        if not pool.confined:
            assert status["Seccomp"] == "0" and int(status["CapEff"], 16) != 0
            continue
        assert status["Seccomp"] == "2" and status["Seccomp_filters"] == "1", status
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[caps], 16) == 0, (caps, status[caps])
        assert status["NoNewPrivs"] == "1"
        targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd") if int(fd) > 2]
        assert not [t for t in targets if t.startswith(("socket:", "pipe:", "anon_inode:[pidfd]"))], targets
        assert len([t for t in targets if t.startswith("/dev/shm/")]) == 1, targets  # its own channel
    state = ask(pool, hostcall, "worker_state")
    assert state["dumpable"] is (not pool.confined)
    inherited = {int(fd) for fd, target in state["fds"].items()
                 if target == os.readlink(f"/proc/self/fd/{leaked_fds['file']}")
                 or target == os.readlink(f"/proc/self/fd/{leaked_fds['socket']}")}
    assert bool(inherited) is (not pool.confined), state["fds"]


def test_a_denied_call_is_a_clear_error(pool, hostcall, tmp_path):
    if pool.confined:
        with pytest.raises(HostFunctionError, match=r"PermissionError: \[Errno 1\] Operation not permitted"):
            ask(pool, hostcall, "make_directory", str(tmp_path / "d"))
    else:
        ask(pool, hostcall, "make_directory", str(tmp_path / "d"))
    assert (tmp_path / "d").exists() is (not pool.confined)
    assert ask(pool, hostcall, "set_dumpable_again")["ok"] is (not pool.confined)
    assert ask(pool, hostcall, "worker_state")["dumpable"] is (not pool.confined)


def test_other_pools_channels_are_unmapped(pool, hostcall, example, tmp_path):
    """A second pool's workers inherit the first pool's channel mappings through the supervisor;
    confined, they unmap every channel but their own."""
    with Pool(workers=1, snapshot_dir=tmp_path, confine_workers=pool.confined) as other:
        assert other.submit(other.snapshot(example("echo")), "echo", (1,)).result(timeout=10) == 1
        pid = other.stats()[0]["pid"]
        with open(f"/proc/{pid}/maps") as f:
            channels = {line.split(maxsplit=5)[5].strip() for line in f if "/dev/shm/hlpool-" in line}
        assert (len(channels) == 1) is pool.confined, channels


def test_confined_workers_keep_working(pool, hostcall, example):
    """Calls, host calls, threads in host functions, deadlines (timer signals), VMs for new
    snapshots, and a replacement worker (confined in its turn)."""
    assert pool.submit(hostcall, "total", (10,)).result(timeout=10) == 135
    assert ask(pool, hostcall, "in_a_thread", 21) == 42
    faults = pool.snapshot(example("faults"))
    with pytest.raises(GuestTimeout):
        pool.submit(faults, "infinite_loop", timeout=0.2).result(timeout=10)
    for name, fn, args, expected in (("add", "add", (2, 40), 42), ("echo", "echo", ([1, "x"],), [1, "x"]),
                                     ("fib", "fib", (20,), 6765)):
        snap = pool.snapshot(example(name))
        for _ in range(4):  # new VMs on both workers, after they were confined
            assert pool.submit(snap, fn, args).result(timeout=10) == expected
    victim = pool.stats()[0]
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        entry = pool.stats()[0]
        if entry["pid"] != victim["pid"] and entry["alive"]:
            break
        time.sleep(0.05)
    replacement = pool.stats()[0]["pid"]
    assert replacement != victim["pid"]
    for _ in range(6):
        assert pool.submit(hostcall, "total", (4,)).result(timeout=10) == 18
    assert confine.process_status(replacement)["Seccomp"] == ("2" if pool.confined else "0")


# ---- an unprivileged worker user -----------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs a pool started as root")
def test_workers_as_an_unprivileged_user(kvm, example):
    store = tempfile.mkdtemp(prefix="hlpool-store-")
    os.chmod(store, 0o755)  # the workers' user reads the snapshot files
    try:
        with Pool(workers=2, snapshot_dir=store, host_functions=HOST, worker_user="nobody") as p:
            hostcall = p.snapshot(example("hostcall"))
            pids = busy_workers(p, hostcall)
            nobody = __import__("pwd").getpwnam("nobody")
            for pid in pids:
                status = confine.process_status(pid)
                assert status["Uid"].split() == [str(nobody.pw_uid)] * 4, status["Uid"]
                assert status["Gid"].split() == [str(nobody.pw_gid)] * 4
                assert status["Groups"] == "" and status["Seccomp"] == "2" and int(status["CapEff"], 16) == 0
            assert p.submit(hostcall, "total", (10,)).result(timeout=10) == 135
            assert ask(p, hostcall, "worker_state")["pdeathsig"] == signal.SIGKILL  # armed again after setuid
            for attack, args in (("read_supervisor_environ", (os.getpid(),)), ("read_sibling_memory", (pids,)),
                                 ("write_snapshot_dir", (store, hostcall.path))):
                outcome = ask(p, hostcall, attack, *args)
                assert outcome["ok"] is False, (attack, outcome)
            with pytest.raises(GuestTimeout):
                p.submit(p.snapshot(example("faults")), "infinite_loop", timeout=0.2).result(timeout=10)
    finally:
        for root, dirs, files in os.walk(store, topdown=False):  # the store holds pin files in a subdirectory
            for name in files:
                path = os.path.join(root, name)
                os.chmod(path, stat.S_IWUSR | stat.S_IRUSR)
                os.unlink(path)
            for name in dirs:
                os.rmdir(os.path.join(root, name))
        os.rmdir(store)


def test_worker_user_is_checked_in_the_supervisor(kvm):
    with pytest.raises(ValueError, match="no such user"):
        Pool(workers=1, worker_user="no-such-user-hlpool")
    with pytest.raises(ValueError, match="confine_workers=True"):
        Pool(workers=1, worker_user="nobody", confine_workers=False)


# ---- the filter and the fallback -----------------------------------------------------------------


def test_the_allowlist_denies_what_it_must():
    allowed = {name for group in confine.ALLOWED.values() for name in group}
    assert not allowed & set(confine.MUST_DENY)


FALLBACK = """
import json, logging, sys
import prctl
sys.modules["pyseccomp"] = None  # as if the binding were not installed
logging.basicConfig(level=logging.WARNING)
from hlpool.pool import confine
prctl.set_no_new_privs(1)
r = confine.confine_worker(open_kvm=lambda: -1)
status = confine.process_status()
print(json.dumps({"seccomp": r.seccomp, "missing": r.missing, "landlock": r.landlock_abi, "dumpable": r.dumpable,
                  "caps": r.capabilities_dropped, "status_seccomp": status["Seccomp"]}))
"""


def test_a_missing_binding_is_one_warning_not_a_crash():
    proc = subprocess.run([sys.executable, "-c", FALLBACK], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["seccomp"] is False and out["status_seccomp"] == "0"
    assert len(out["missing"]) == 1 and out["missing"][0].startswith("seccomp: ")
    assert out["dumpable"] is False and out["landlock"] >= 1
    assert proc.stderr.count("WARNING") == 1 and "confined only in part" in proc.stderr
