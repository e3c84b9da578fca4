"""The guest image: everything about what runs inside a VM, before any VM exists.

The guest/host contract (:mod:`.abi`, read from the SDK header ``sdk/include/hlpool_abi.h``),
ELF loading and relocation (:mod:`.elf`), the guest-physical memory layout (:mod:`.layout`),
the boot state (:mod:`.boot`: system pages, page tables, registers), the call entry stub
(:mod:`.entry_stub`), the value codec (:mod:`.codec`), fault descriptions (:mod:`.faults`),
the guest's log (:mod:`.log`), building guests from C (:mod:`.build`, the SDK in ``sdk/``),
the example guests (:mod:`.examples`, sources in ``programs/``) and the interpreter guests'
build (:mod:`.interpreters`), plus the pure-Python page-table reference (:mod:`.pagetables`).

May import: :mod:`hlpool.errors`, :mod:`hlpool.defaults`, :mod:`hlpool._mapping`, :mod:`hlpool.kvm`.
"""
