"""Flatten: one standalone layer from a snapshot's chain of layers (:meth:`Snapshot.flatten`).

Reads every run of the snapshot through read-only views of its layers (no VM
needed) and lays the non-zero pages out in one new in-memory layer; zero pages
become zero runs. The result has the same guest-visible memory, vCPU state,
exports and mapped files, and no parent; persisting it gives a file that opens
without any of the chain's files.
"""

from __future__ import annotations

import dataclasses

from hlpool.memory.image import S
from hlpool.memory.layers import Run
from hlpool.snapshot.capture import _classify, _Piece, lay_out
from hlpool.snapshot.regions import SLOTS


def flatten_snapshot(snapshot: S) -> S:
    """A single-layer copy of ``snapshot`` (in memory; ``persist`` it to get one file)."""
    pieces_by_slot: dict[str, list[_Piece]] = {}
    for slot in SLOTS:
        pieces: list[_Piece] = []
        for run in snapshot.runs[slot]:
            # No dirty pages and copy-all: the layer's bytes become new data, zero pages zero runs.
            pieces.extend(_classify(snapshot, 0, Run(run.first_page, run.count, run.layer, run.offset),
                                    [], None, True))
        pieces_by_slot[slot] = pieces
    runs, layer = lay_out(pieces_by_slot, 0)
    return dataclasses.replace(snapshot, layers=(layer,), runs=runs, parent=None, path=None,
                               info=dict(snapshot.info))
