"""Guest memory: immutable layers, how a VM's memory slots map them, restore, mapped files.

:mod:`.layers` (immutable page data in a sealed memfd or a read-only file; runs of pages),
:mod:`.image` (the fields of a snapshot, as a protocol the layers below the snapshot package use),
:mod:`.guest_memory` (a VM's memory slots over the layers, dirty tracking, restore
policy), :mod:`._dirty` (Cython: dirty pages, the restore loop and its working set),
:mod:`.mapped_files` (host files mapped read-only into a guest).

May import: :mod:`hlpool.errors`, :mod:`hlpool.defaults`, :mod:`hlpool._mapping`,
:mod:`hlpool.kvm`, :mod:`hlpool.guest`.
"""
