"""The KVM layer: `/dev/kvm`, VMs, vCPUs and the raw ABI, nothing about guests.

Modules: :mod:`.abi` (ioctl numbers, structs, exit reasons: the one Python table;
``kvm.pxd`` is the one Cython table), :mod:`.system` (the ``/dev/kvm`` handle and its
capabilities), :mod:`.vm` (a VM and its memory slots), :mod:`.vcpu` (a vCPU, its
``kvm_run`` page and saved state), :mod:`.pvm` (PVM detection and native execution),
``_vcpu_run`` (Cython: ``KVM_RUN`` with sync regs, deadlines).

May import: :mod:`hlpool.errors`, :mod:`hlpool._mapping`. Nothing else of hlpool.
"""
