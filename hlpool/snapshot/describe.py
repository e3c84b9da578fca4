"""A snapshot as plain JSON-friendly values (``hlpool snapshot inspect`` and the HTTP service).

May import: :mod:`hlpool.snapshot` and everything below it.
"""

from __future__ import annotations

import os
from typing import Any

from hlpool.snapshot.snapshot import Snapshot


def describe_snapshot(snap: Snapshot) -> dict[str, Any]:
    """Path, exports, layers, parent chain, memory sizes, regions and mapped files of ``snap``."""
    chain = []
    s = snap
    while s is not None:
        chain.append(s.path or "<memory>")
        s = s.parent
    return {
        "path": snap.path,
        "exports": list(snap.exports or ()),
        "layers": [{"index": i, "sha256": layer.sha256.hex(), "bytes": layer.size, "file": layer.path}
                   for i, layer in enumerate(snap.layers)],
        "parent_chain": chain[1:],
        "memory": {"guest_bytes": snap.layout.guest_memory_size, "heap": snap.layout.heap.size,
                   "stack": snap.layout.stack.size, "image": snap.layout.image.size,
                   "input": snap.layout.input.size, "output": snap.layout.out.size},
        "regions": [{"address": hex(r.guest_address), "size": r.size, "area": r.area, "perms": r.perms,
                     "backing": r.backing, "layer": r.layer, "file": r.path} for r in snap.regions],
        "mapped_files": [{"path": f.path, "address": hex(f.guest_address), "size": f.size,
                          "sha256": f.sha256.hex()} for f in snap.mapped_files],
    }


def describe_file(path: str | os.PathLike) -> dict[str, Any]:
    """:func:`describe_snapshot` of the snapshot file at ``path``; its mappings are released right after."""
    snap = Snapshot.open(path)
    try:
        return describe_snapshot(snap)
    finally:
        for layer in snap.layers:
            try:
                layer.close()
            except Exception:
                pass
