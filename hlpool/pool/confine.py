"""Confining a pool worker once it holds what it needs.

A worker runs host functions (the pool's Python callables) on behalf of
guests, so it is the process an attacker who subverts a host function ends
up in. Before it serves its first call the worker therefore gives up what it
does not need, in this order (each step needs what the next one removes):

1. ``/dev/kvm`` is opened (and kept: new VMs are created through it later);
2. capabilities: the bounding set is emptied and the securebits locked so
   that uid 0 never regains them; with ``user`` (only when started as root)
   the worker switches to that user's uid/gid with no supplementary groups
   (and arms ``PR_SET_PDEATHSIG`` again: a change of uid clears it); then
   the effective, permitted, inheritable and ambient sets are emptied.
   KVM, ``mmap``, POSIX timers and the posix_ipc channel need none: access to
   ``/dev/kvm`` is checked when it is opened, which happened in step 1;
3. ``PR_SET_DUMPABLE`` 0: siblings and other processes of the same uid can no
   longer read its memory (``/proc/PID/mem``, ``process_vm_readv``), take its
   fds (``pidfd_getfd``) or ptrace it without ``CAP_SYS_PTRACE``;
4. every inherited fd is closed except stdin/stdout/stderr, the streams of
   the logging handlers, ``/dev/kvm`` and the worker's channel; shared
   mappings of other pools' channels (inherited from the supervisor through
   the spawner) are unmapped;
5. Landlock (where the kernel has it): no file can be created, written,
   truncated, removed, renamed or executed by path, and -- Landlock's scoping
   of ptrace, signals and abstract unix sockets -- the worker cannot inspect
   (``/proc/PID/environ``, ``/proc/PID/mem``), trace or signal any process
   outside its own Landlock domain: not the supervisor, not a sibling;
6. a seccomp filter (libseccomp through ``pyseccomp``): only the system calls
   in :data:`ALLOWED` pass (some only with the arguments given there); every
   other call fails with ``EPERM``, so a host function that tries one sees an
   ordinary ``PermissionError`` and the worker goes on serving. (Killing the
   worker instead would turn one host function's probe into a crash of every
   call in flight on that worker and hide the reason.) ``clone3`` fails with
   ``ENOSYS`` so that glibc falls back to ``clone``, whose flags the filter
   can check (threads only, no new processes). The kernel logs each denial
   (audit record type 1326 in the kernel log: pid, comm, syscall number).

``no_new_privs`` is set earlier, in ``worker._prepare_process``.

A step the kernel or the environment does not offer (no Landlock, no
libseccomp, ...) is skipped with one warning; a worker is never stopped for
it. :func:`confine_worker` returns what was applied.

Left as it is: reading files. Snapshots and the host files they map can live
anywhere, and host functions may read their own data, so the worker may still
open any file for reading that its uid may read. Running workers under their
own ``user`` is what keeps them from root-only files.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import pwd
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, Collection, Sequence

import prctl

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

# prctl(2) options
PR_GET_PDEATHSIG = 2
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_GET_NAME = 16
PR_GET_SECCOMP = 21
PR_CAPBSET_READ = 23
PR_GET_SECUREBITS = 27
PR_GET_NO_NEW_PRIVS = 39
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_VMA = 0x53564D41

# Landlock (x86_64 syscall numbers; the same on every architecture since 5.13)
_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_FS_EXECUTE = 1 << 0
_FS_WRITE_FILE = 1 << 1
_FS_REMOVE_DIR = 1 << 4
_FS_REMOVE_FILE = 1 << 5
_FS_MAKE_CHAR = 1 << 6
_FS_MAKE_DIR = 1 << 7
_FS_MAKE_REG = 1 << 8
_FS_MAKE_SOCK = 1 << 9
_FS_MAKE_FIFO = 1 << 10
_FS_MAKE_BLOCK = 1 << 11
_FS_MAKE_SYM = 1 << 12
_FS_REFER = 1 << 13  # ABI 2
_FS_TRUNCATE = 1 << 14  # ABI 3
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
_SCOPE_SIGNAL = 1 << 1  # ABI 6

# open(2) flags that write or create; an openat whose flags carry none of them only reads
_O_WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | 0o20000000  # __O_TMPFILE
_CLONE_THREAD = 0x00010000
_LOW32 = 0xFFFFFFFF

# ioctl requests other than KVM's (whose type byte is 0xAE): isatty(), terminal size, non-blocking and
# close-on-exec flags, bytes readable. Not TIOCSTI and friends.
_TTY_IOCTLS = {"TCGETS": 0x5401, "TIOCGWINSZ": 0x5413, "FIONREAD": 0x541B, "FIONBIO": 0x5421,
               "FIONCLEX": 0x5450, "FIOCLEX": 0x5451}
_KVMIO = 0xAE

# The system calls a worker makes, found by tracing workers under the test suite (strace -f, every
# process named hlpool-worker-N, from the moment it is named) and grouped by what needs them. The
# call path itself is: futex (the channel's semaphores), ioctl (KVM_RUN, KVM_RESET_DIRTY_RINGS, ...),
# timer_settime (the deadline), getpid; a new VM adds openat/newfstatat/pread64/mmap/munmap/close and
# KVM ioctls. The rest is what Python itself, its error paths and ordinary host functions use.
ALLOWED: dict[str, tuple[str, ...]] = {
    # the channel, the VMs, the deadline timer (seen in the traces)
    "worker": ("futex", "ioctl", "timer_create", "timer_settime", "timer_gettime", "timer_delete",
               "timer_getoverrun", "getpid", "gettid", "openat", "newfstatat", "fstat", "pread64", "read",
               "lseek", "mmap", "munmap", "close", "brk", "rt_sigaction", "rt_sigreturn", "exit_group",
               "write"),
    # memory, threads, signals and time as the Python runtime uses them
    "runtime": ("mprotect", "madvise", "mremap", "exit", "rt_sigprocmask", "rt_sigpending", "rt_sigtimedwait",
                "sigaltstack", "restart_syscall", "clone", "set_robust_list", "get_robust_list", "rseq",
                "sched_yield", "sched_getaffinity", "getcpu", "clock_gettime", "clock_getres", "gettimeofday",
                "time", "clock_nanosleep", "nanosleep", "getrandom", "kill", "tgkill", "prctl", "prlimit64",
                "getrlimit", "getrusage", "times", "sysinfo", "uname", "getppid", "getuid", "geteuid",
                "getgid", "getegid", "getresuid", "getresgid", "getgroups", "getpgrp", "getcwd", "setitimer",
                "getitimer", "alarm"),
    # reading files and the fds a worker holds (tracebacks read sources; host functions read data)
    "files": ("readv", "preadv", "preadv2", "writev", "statx", "stat", "lstat", "fstatfs", "statfs",
              "getdents64", "readlink", "readlinkat", "access", "faccessat", "faccessat2", "fcntl", "dup",
              "dup2", "dup3", "poll", "ppoll", "select", "pselect6", "epoll_create1", "epoll_ctl",
              "epoll_wait", "epoll_pwait", "pipe2", "eventfd2", "close_range"),
    # host functions that talk to a service over TCP/UDP (socket() only for AF_INET/AF_INET6; no bind,
    # listen or accept; unix sockets only as an unnamed socketpair, as asyncio's self-pipe)
    "network": ("socket", "socketpair", "connect", "sendto", "recvfrom", "sendmsg", "recvmsg", "sendmmsg",
                "recvmmsg", "shutdown", "getsockname", "getpeername", "getsockopt", "setsockopt"),
}

# Denied by not being allowed; listed because the tests check each of them (a sibling's or the
# supervisor's memory, fds and environment; new programs; kernel attack surface).
MUST_DENY = ("ptrace", "process_vm_readv", "process_vm_writev", "pidfd_open", "pidfd_getfd",
             "pidfd_send_signal", "kcmp", "bpf", "perf_event_open", "mount", "umount2", "unshare", "setns",
             "keyctl", "add_key", "request_key", "execve", "execveat", "fork", "vfork", "tkill",
             "userfaultfd", "io_uring_setup", "memfd_create", "mknod", "mknodat", "unlink", "unlinkat",
             "rename", "renameat", "renameat2", "mkdir", "mkdirat", "chmod", "fchmod", "fchmodat",
             "chown", "fchown", "fchownat", "truncate", "ftruncate", "setuid", "setgid", "capset",
             "seccomp", "init_module", "finit_module", "open_by_handle_at", "name_to_handle_at",
             "bind", "listen", "accept", "accept4", "open", "creat", "openat2", "clone3")


@dataclass
class Confinement:
    """What :func:`confine_worker` applied (``missing``: what it could not, with the reason)."""

    kvm_fd: int = -1
    uid: int = -1
    gid: int = -1
    capabilities_dropped: bool = False
    dumpable: bool = True
    closed_fds: int = 0
    unmapped: int = 0
    landlock_abi: int = 0
    seccomp: bool = False
    missing: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing


def prepare(user: str | int | None) -> tuple[int, int] | None:
    """Run in the supervisor, before workers are forked: loads the seccomp binding (finding
    libseccomp runs ``ldconfig``, which a confined worker cannot) and returns ``(uid, gid)``
    of ``user`` (a name or a uid), or None. ``ValueError`` if the user does not exist or this
    process cannot switch to it (not root)."""
    _seccomp_module()
    if user is None:
        return None
    try:
        entry = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
    except KeyError:
        raise ValueError(f"worker_user {user!r}: no such user") from None
    if os.geteuid() != 0:
        raise ValueError(f"worker_user {user!r}: only a pool started as root can run its workers as "
                         "another user")
    if entry.pw_uid == 0:
        raise ValueError("worker_user: give an unprivileged user, not root")
    return entry.pw_uid, entry.pw_gid


def confine_worker(*, user: tuple[int, int] | None = None, keep_paths: Collection[str] = (),
                   unmap_prefixes: Sequence[str] = (), open_kvm: Callable[[], int] | None = None,
                   keep_fds: Collection[int] = ()) -> Confinement:
    """Confine the calling worker process (see the module's description); never raises.

    ``user``: ``(uid, gid)`` from :func:`prepare`, or None to keep the current uid.
    ``keep_paths``: files (the worker's channel) whose fds stay open and whose shared mappings
    stay mapped. ``keep_fds``: more fds that stay open (the worker's notification eventfd).
    ``unmap_prefixes``: shared mappings of other files whose path starts with one
    of these are unmapped (other pools' channels, inherited from the supervisor through the
    spawner). ``open_kvm``: opens ``/dev/kvm`` and returns the fd (default: the process-wide
    handle of :func:`hlpool.kvm.system.system`).
    """
    result = Confinement()
    seccomp = _seccomp_module()  # before Landlock: loading it may need to run ldconfig
    steps: list[tuple[str, Callable[[Confinement], None]]] = [
        ("/dev/kvm", lambda r: _open_kvm(r, open_kvm)),
        ("capabilities", lambda r: _drop_privileges(r, user)),
        ("dumpable", _set_not_dumpable),
        ("inherited fds", lambda r: _close_inherited_fds(r, keep_paths, keep_fds)),
        ("inherited mappings", lambda r: _unmap_foreign(r, keep_paths, unmap_prefixes)),
        ("landlock", _restrict_landlock),
        ("seccomp", lambda r: _load_seccomp(r, seccomp)),
    ]
    if threading.active_count() > 1:
        result.missing.append(f"threads: {threading.active_count()} threads exist; only the calling one "
                              "is confined by Landlock")
    for name, step in steps:
        try:
            step(result)
        except Exception as exc:  # never stop a worker for what the host lacks
            result.missing.append(f"{name}: {type(exc).__name__}: {exc}")
    if result.missing:
        log.warning("worker %d confined only in part: %s", os.getpid(), "; ".join(result.missing))
    return result


# ---- the steps ---------------------------------------------------------------------------------


def _open_kvm(result: Confinement, open_kvm: Callable[[], int] | None) -> None:
    if open_kvm is None:
        from hlpool.kvm.system import system

        def open_kvm() -> int:
            return system().fd
    result.kvm_fd = open_kvm()


def _drop_privileges(result: Confinement, user: tuple[int, int] | None) -> None:
    root = os.geteuid() == 0
    if root:
        # uid 0 must not regain capabilities through execve or a uid change (needs CAP_SETPCAP: first)
        prctl.securebits.noroot = True
        prctl.securebits.noroot_locked = True
        prctl.securebits.keep_caps_locked = True
        for cap in range(_last_cap() + 1):
            if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
                raise OSError(ctypes.get_errno(), f"PR_CAPBSET_DROP {cap}: {os.strerror(ctypes.get_errno())}")
    if user is not None:
        uid, gid = user
        if not root:
            raise PermissionError("switching to another user needs a pool started as root")
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        # a change of credentials clears the parent-death signal: arm it again
        prctl.set_pdeathsig(signal.SIGKILL)
        if os.getppid() == 1:
            os._exit(1)  # the spawner died meanwhile
    if _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_CAP_AMBIENT_CLEAR_ALL failed")
    # effective first: it must stay a subset of permitted at every step
    prctl.cap_effective.limit()
    prctl.cap_permitted.limit()
    prctl.cap_inheritable.limit()
    result.uid, result.gid = os.getuid(), os.getgid()
    result.capabilities_dropped = _capabilities_in("CapEff") == 0 and _capabilities_in("CapPrm") == 0


def _set_not_dumpable(result: Confinement) -> None:
    # after any uid change: changing uids resets dumpable to fs.suid_dumpable
    prctl.set_dumpable(False)
    result.dumpable = bool(prctl.get_dumpable())


def _linked_path(link: str) -> str:
    return link[:-len(" (deleted)")] if link.endswith(" (deleted)") else link


def _close_inherited_fds(result: Confinement, keep_paths: Collection[str], keep_fds: Collection[int] = ()) -> None:
    keep = {0, 1, 2, result.kvm_fd} | _stream_fds() | set(keep_fds)
    closed = 0
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in keep:
            continue
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the directory's own fd, already closed
        if _linked_path(target) in keep_paths:
            continue
        try:
            os.close(fd)
            closed += 1
        except OSError:
            pass
    result.closed_fds = closed


def _unmap_foreign(result: Confinement, keep_paths: Collection[str], prefixes: Sequence[str]) -> None:
    if not prefixes:
        return
    foreign = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or not fields[1].endswith("s"):
                continue
            path = _linked_path(fields[5].rstrip("\n"))
            if path.startswith(tuple(prefixes)) and path not in keep_paths:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                foreign.append((start, end - start))
    for start, length in foreign:
        if _libc.munmap(ctypes.c_void_p(start), ctypes.c_size_t(length)) != 0:
            raise OSError(ctypes.get_errno(), f"munmap: {os.strerror(ctypes.get_errno())}")
    result.unmapped = len(foreign)


def _stream_fds() -> set[int]:
    """fds behind sys.std* and the logging handlers' streams: where the worker's logs go."""
    streams: list[object] = [sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__, sys.__stderr__]
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for handler in lg.handlers:
            streams += [getattr(handler, "stream", None), getattr(handler, "socket", None)]
    fds = set()
    for stream in streams:
        try:
            fds.add(stream.fileno())  # type: ignore[union-attr]
        except Exception:
            pass
    return fds


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0: none or disabled)."""
    abi = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                        ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    return max(int(abi), 0)


def _restrict_landlock(result: Confinement) -> None:
    abi = landlock_abi()
    if abi < 1:
        raise OSError(ctypes.get_errno(), "the kernel has no Landlock (or it is disabled)")
    handled = (_FS_EXECUTE | _FS_WRITE_FILE | _FS_REMOVE_DIR | _FS_REMOVE_FILE | _FS_MAKE_CHAR | _FS_MAKE_DIR
               | _FS_MAKE_REG | _FS_MAKE_SOCK | _FS_MAKE_FIFO | _FS_MAKE_BLOCK | _FS_MAKE_SYM)
    if abi >= 2:
        handled |= _FS_REFER
    if abi >= 3:
        handled |= _FS_TRUNCATE
    attr = _RulesetAttr(handled_access_fs=handled, handled_access_net=0, scoped=0)
    size = 8  # ABI 1-3: handled_access_fs only
    if abi >= 4:
        size = 16
    if abi >= 6:
        attr.scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL
        size = 24
    fd = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        raise OSError(ctypes.get_errno(), f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
    try:
        # no rules: none of the handled accesses is allowed anywhere
        if _libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(fd), ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)
    result.landlock_abi = abi


def build_seccomp_filter(pid: int):
    """The worker's filter (a ``pyseccomp.SyscallFilter``, not loaded); ``pid``: the worker's."""
    sc = _seccomp_module()
    deny = sc.ERRNO(errno.EPERM)
    f = sc.SyscallFilter(deny)
    # all threads; denials in the kernel log; a binary tree of syscalls; a 32-bit (int 0x80) or x32
    # system call kills the process (nothing in a worker makes one)
    for attr, value in ((sc.Attr.CTL_TSYNC, 1), (sc.Attr.CTL_LOG, 1), (sc.Attr.CTL_OPTIMIZE, 2),
                        (sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)):
        try:
            f.set_attr(attr, value)
        except OSError:
            pass  # an older libseccomp or kernel: the filter works without them
    conditional = {"ioctl", "openat", "clone", "kill", "tgkill", "prctl", "prlimit64", "socket", "socketpair"}
    for group in ALLOWED.values():
        for name in group:
            if name not in conditional:
                _add(f, sc.ALLOW, name)
    low = sc.MASKED_EQ
    _add(f, sc.ALLOW, "ioctl", sc.Arg(1, low, 0xFF00, _KVMIO << 8))  # every KVM ioctl (type 0xAE)
    for request in _TTY_IOCTLS.values():
        _add(f, sc.ALLOW, "ioctl", sc.Arg(1, low, _LOW32, request))
    _add(f, sc.ALLOW, "openat", sc.Arg(2, low, _O_WRITING, 0))  # read-only opens
    _add(f, sc.ALLOW, "clone", sc.Arg(0, low, _CLONE_THREAD, _CLONE_THREAD))  # threads, not processes
    _add(f, sc.ERRNO(errno.ENOSYS), "clone3")  # its flags are out of the filter's reach: glibc falls back
    _add(f, sc.ALLOW, "kill", sc.Arg(0, low, _LOW32, pid))  # signals to itself only
    _add(f, sc.ALLOW, "tgkill", sc.Arg(0, low, _LOW32, pid))
    for option in (PR_GET_PDEATHSIG, PR_GET_DUMPABLE, PR_SET_NAME, PR_GET_NAME, PR_GET_SECCOMP, PR_CAPBSET_READ,
                   PR_GET_SECUREBITS, PR_GET_NO_NEW_PRIVS, PR_SET_VMA):
        _add(f, sc.ALLOW, "prctl", sc.Arg(0, low, _LOW32, option))
    _add(f, sc.ALLOW, "prlimit64", sc.Arg(2, sc.EQ, 0))  # reading limits, not setting them
    for family in (2, 10):  # AF_INET, AF_INET6
        _add(f, sc.ALLOW, "socket", sc.Arg(0, low, _LOW32, family))
    _add(f, sc.ALLOW, "socketpair", sc.Arg(0, low, _LOW32, 1))  # AF_UNIX, unnamed
    for name in ("ioctl", "futex", "timer_settime", "getpid"):  # the call path: first in the tree
        try:
            f.syscall_priority(name, 255)
        except (OSError, ValueError):
            pass
    return f


def _add(f, action: int, name: str, *args) -> None:
    sc = _seccomp_module()
    number = sc.resolve_syscall(sc.Arch.NATIVE, name)
    if number < 0:
        log.debug("seccomp: libseccomp does not know %s; left out", name)
        return
    f.add_rule(action, number, *args)


_pyseccomp = None
_pyseccomp_error = ""


def _seccomp_module():
    """``pyseccomp``, imported once per process (None if it or libseccomp.so.2 is missing)."""
    global _pyseccomp, _pyseccomp_error
    if _pyseccomp is None and not _pyseccomp_error:
        try:
            import pyseccomp  # needs libseccomp.so.2 (Debian: libseccomp2)

            _pyseccomp = pyseccomp
        except (ImportError, RuntimeError, OSError) as exc:
            _pyseccomp_error = f"{type(exc).__name__}: {exc}"
    return _pyseccomp


def _load_seccomp(result: Confinement, module) -> None:
    if module is None:
        raise RuntimeError(f"pyseccomp/libseccomp unavailable ({_pyseccomp_error})")
    build_seccomp_filter(os.getpid()).load()
    result.seccomp = True


# ---- reading the state back (tests, diagnostics) ---------------------------------------------------


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return prctl.CAP_LAST_CAP


def _capabilities_in(field_name: str, pid: int | str = "self") -> int:
    return int(process_status(pid)[field_name], 16)


def process_status(pid: int | str = "self") -> dict[str, str]:
    """``/proc/PID/status`` as a dict (``Seccomp``, ``CapEff``, ``NoNewPrivs``, ``Uid``, ...)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out
