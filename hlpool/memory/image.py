"""The fields a snapshot is made of, as a protocol the layers below the snapshot package use.

A machine is made from these fields, capture and the file format read them, and
:class:`hlpool.Snapshot` has them all. Typing the lower layers against this
protocol keeps them free of any reference to the snapshot package above them.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

from hlpool.guest.layout import Layout
from hlpool.kvm.vcpu import VcpuState
from hlpool.memory.layers import Layer, Run
from hlpool.memory.mapped_files import MappedFile


class SnapshotImage(Protocol):
    """The immutable state a machine starts from (what :class:`hlpool.Snapshot` holds)."""

    layout: Layout
    vcpu: VcpuState
    exports: tuple[str, ...] | None  # None: a boot image, before hl_main ran
    layers: tuple[Layer, ...]
    runs: dict[str, list[Run]]
    image_segments: tuple[tuple[int, int, str], ...]
    mapped_files: tuple[MappedFile, ...]
    parent: Any  # the snapshot this one is layered on, or None
    path: str | None
    info: dict[str, Any]


#: A concrete snapshot type (functions that build snapshots return the type they were given).
S = TypeVar("S", bound=SnapshotImage)
