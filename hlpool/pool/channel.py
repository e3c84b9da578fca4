"""The channel between the supervisor and one worker: one posix_ipc shared memory mapping.

Layout of the mapping: ``depth`` slots, each a 128-byte header and a data area,
then a page holding two process-shared semaphores, ``requests`` and
``responses`` (:class:`hlpool.pool._slots.SharedSemaphore`). The supervisor
writes a request into the next slot and posts ``requests``; the worker answers
in the same slot and posts ``responses``. Both sides walk the slots in order,
so at most ``depth`` calls are in flight per worker and no other
synchronisation is needed. The records of the hot path are read and written by
:mod:`hlpool.pool._slots` (Cython) in the layout ``HEADER``/``RESPONSE`` describe.

The mapping's name exists only for the moment it takes the spawner to open it:
the supervisor unlinks it right after, so nothing is left in /dev/shm when a
process is killed. Leftovers of a supervisor killed inside that window are
removed by :func:`remove_stale_names` when the next pool starts.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import struct
from dataclasses import dataclass

import posix_ipc

from hlpool.errors import HlpoolError
from hlpool.pool import _slots

PREFIX = "hlpool-"
HEADER = struct.Struct("<16Q")  # 128 bytes
HEADER_SIZE = HEADER.size
TAKEN = struct.Struct("<Q")  # the header's last field: the request id the worker took (see mark_taken)
TAKEN_OFFSET = HEADER_SIZE - TAKEN.size
RESPONSE = struct.Struct("<7Q")  # the response's fields at the start of the header (the rest unused)
SEMAPHORE_PAGE = 4096  # after the slots: the two semaphores, a cache line apart

OP_CALL = 1
OP_STOP = 2
OP_OPEN = 3  # open the snapshot at the path (no call): a hint sent when a snapshot is registered
STATUS_OK = 0
STATUS_ERROR = 1

# Request header: op, request id, timeout (ns from when the worker starts it, 0 = none), path length, function name
# length, payload length, expiry (CLOCK_MONOTONIC ns by which the call must end, queue time included; 0 = none),
# notify (1: also signal the worker's notification eventfd after answering, for an event loop that
# collects the answer; see hlpool.pool.loopcollect). Response header: status, request id, data length, VMs held, ns the worker
# spent on the call (its service time: the supervisor's cost estimate for routing and batching), VMs made,
# VM switches done.
MAX_PATH = 4096
MAX_NAME = 256


@dataclass(frozen=True)
class ChannelNames:
    shm: str
    size: int  # of the mapping: depth slots and the semaphore page
    depth: int


class Channel:
    """One side's handle on a channel (shared memory mapping + semaphores)."""

    def __init__(self, names: ChannelNames, memory: mmap.mmap, create: bool = False) -> None:
        slots_size = names.size - SEMAPHORE_PAGE
        if names.depth < 1 or slots_size < names.depth * (HEADER_SIZE + 1) or len(memory) != names.size:
            raise HlpoolError(f"channel layout does not fit its mapping ({names})")
        self.names = names
        self.memory = memory
        self.view = memoryview(memory)
        # sem_init'ed by the creator (the supervisor), before any worker attaches
        self.requests = _slots.SharedSemaphore(self.view, slots_size, create)
        self.responses = _slots.SharedSemaphore(self.view, slots_size + _slots.SEMAPHORE_BYTES, create)
        self.depth = names.depth
        self.slot_size = slots_size // names.depth
        self.data_capacity = self.slot_size - HEADER_SIZE
        # Offset of each slot in the mapping: request/answer ``i`` is in slot ``i % depth``. The
        # pool's hot path calls hlpool.pool._slots with these itself (no method call per record).
        self.offsets = [self._slot(i) for i in range(self.depth)]

    # ---- creation ---------------------------------------------------------------------

    @classmethod
    def create(cls, depth: int, data_capacity: int) -> "Channel":
        """Create the shared memory and its semaphores (supervisor side); the name stays until :meth:`unlink`."""
        slot = (HEADER_SIZE + data_capacity + 4095) & ~4095
        size = slot * depth + SEMAPHORE_PAGE
        names = ChannelNames(f"/{PREFIX}{os.getpid()}-{secrets.token_hex(6)}-m", size, depth)
        try:
            shm = posix_ipc.SharedMemory(names.shm, posix_ipc.O_CREX, mode=0o600, size=size)
        except posix_ipc.Error as exc:
            raise HlpoolError(f"cannot create shared memory for a worker: {exc}") from None
        try:
            memory = mmap.mmap(shm.fd, size)
        except OSError as exc:
            _unlink_quietly(names)
            raise HlpoolError(f"cannot map shared memory for a worker: {exc}") from None
        finally:
            shm.close_fd()
        return cls(names, memory, create=True)

    @classmethod
    def attach(cls, names: ChannelNames) -> "Channel":
        """Open an existing channel by name (the spawner does this before forking a worker)."""
        shm = posix_ipc.SharedMemory(names.shm)
        try:
            memory = mmap.mmap(shm.fd, names.size)
        finally:
            shm.close_fd()
        return cls(names, memory)

    def unlink(self) -> None:
        _unlink_quietly(self.names)

    def close(self) -> None:
        self.requests.close()
        self.responses.close()
        try:
            self.view.release()
            self.memory.close()
        except BufferError:
            pass  # a view is still held (a thread still waiting); the mapping goes with the process

    # ---- slots --------------------------------------------------------------------------

    def _slot(self, index: int) -> int:
        return (index % self.depth) * self.slot_size

    def write_request(self, index: int, request_id: int, path: bytes, function: bytes, payload: bytes,
                      timeout_ns: int, expires_ns: int = 0, op: int = OP_CALL, notify: bool = False) -> None:
        _slots.write_request(self.view, self._slot(index), self.data_capacity, op, request_id,
                             path, function, payload, timeout_ns, expires_ns, notify)

    def write_stop(self, index: int) -> None:
        HEADER.pack_into(self.view, self._slot(index), OP_STOP, *([0] * 15))

    def read_request(self, index: int) -> tuple[int, int, int, int, str, str, memoryview, bool]:
        """(op, request id, timeout ns, expiry (CLOCK_MONOTONIC ns, 0: none), snapshot path, function,
        payload view, notify) of slot ``index``."""
        op, request_id, timeout, expires, path, function, start, length, notify = _slots.read_request(
            self.view, self._slot(index), self.data_capacity, OP_CALL, OP_OPEN)
        return op, request_id, timeout, expires, path, function, self.view[start:start + length], notify

    def mark_taken(self, index: int, request_id: int) -> None:
        """Worker side: record that the request in slot ``index`` is being run (before running it)."""
        _slots.mark_taken(self.view, self._slot(index), self.data_capacity, request_id)

    def taken(self, index: int, request_id: int) -> bool:
        """Supervisor side, once the worker is dead: did it start the request ``request_id`` in slot ``index``?
        A request it never took had no effect, so it can be run by another worker."""
        return TAKEN.unpack_from(self.view, self._slot(index) + TAKEN_OFFSET)[0] == request_id

    def write_response(self, index: int, request_id: int, status: int, data: bytes, sandboxes: int,
                       run_ns: int = 0, created: int = 0, switches: int = 0) -> None:
        _slots.write_response(self.view, self._slot(index), self.data_capacity, status,
                              request_id, data, sandboxes, run_ns, created, switches)

    def read_response(self, index: int) -> tuple[int, int, bytes, tuple[int, int, int, int]]:
        """(status, request id, data, worker figures) of slot ``index``; the figures are the VMs the
        worker holds, the ns it spent on the call, the VMs it has made and the switches it has done."""
        return _slots.read_response(self.view, self._slot(index), self.data_capacity)


def _unlink_quietly(names: ChannelNames) -> None:
    try:
        posix_ipc.unlink_shared_memory(names.shm)
    except posix_ipc.ExistentialError:
        pass


# ("sem." and the -q/-r names: the named semaphores of channels made by earlier versions)
_STALE = re.compile(r"^(?:sem\.)?hlpool-(\d+)-[0-9a-f]+-[mqr]$")


def remove_stale_names(shm_dir: str = "/dev/shm") -> int:
    """Unlink channel names left by supervisors that no longer exist; returns how many."""
    removed = 0
    try:
        entries = os.listdir(shm_dir)
    except OSError:
        return 0
    for entry in entries:
        match = _STALE.match(entry)
        if not match:
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
            continue  # its supervisor is alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            os.unlink(os.path.join(shm_dir, entry))
            removed += 1
        except OSError:
            pass
    return removed
