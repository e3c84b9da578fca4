# The KVM ABI for Cython, taken from the kernel's own ``<linux/kvm.h>`` (and the
# ``<asm/kvm.h>`` it includes).
#
# Every number and layout comes from the header at C compile time: the names
# below are declarations, not values, and a struct lists only the fields hlpool
# touches (the C compiler uses the real definition, so offsets and sizes are the
# kernel's). ``hlpool/kvm/abi.py`` is the Python-side table of the same ABI;
# ``tests/test_contracts.py`` checks that it equals what this header says (via
# ``hlpool.kvm._vcpu_run.kvm_header_values()``).
#
# Usage: ``from hlpool.kvm cimport kvm`` then ``kvm.KVM_RUN``, ``kvm.kvm_run`` ...

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "<linux/kvm.h>" nogil:
    # ---- API version, capabilities, exit reasons (plain int macros) ----
    enum:
        KVM_API_VERSION

        KVM_CAP_NR_MEMSLOTS
        KVM_CAP_XSAVE
        KVM_CAP_GET_TSC_KHZ
        KVM_CAP_SYNC_REGS
        KVM_CAP_READONLY_MEM
        KVM_CAP_IMMEDIATE_EXIT
        KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
        KVM_CAP_DIRTY_LOG_RING
        KVM_CAP_X86_MSR_FILTER

        KVM_EXIT_UNKNOWN
        KVM_EXIT_EXCEPTION
        KVM_EXIT_IO
        KVM_EXIT_HYPERCALL
        KVM_EXIT_DEBUG
        KVM_EXIT_HLT
        KVM_EXIT_MMIO
        KVM_EXIT_SHUTDOWN
        KVM_EXIT_FAIL_ENTRY
        KVM_EXIT_INTR
        KVM_EXIT_INTERNAL_ERROR
        KVM_EXIT_SYSTEM_EVENT
        KVM_EXIT_DIRTY_RING_FULL

        KVM_EXIT_IO_IN
        KVM_EXIT_IO_OUT

        # From <asm/kvm.h>: pages into the vCPU mapping where the dirty ring starts.
        KVM_DIRTY_LOG_PAGE_OFFSET

        # From <asm/kvm.h>: MSR filter flags.
        KVM_MSR_FILTER_READ
        KVM_MSR_FILTER_WRITE
        KVM_MSR_FILTER_DEFAULT_ALLOW
        KVM_MSR_FILTER_DEFAULT_DENY
        KVM_MSR_FILTER_MAX_RANGES

        # KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 flags.
        KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        KVM_DIRTY_LOG_INITIALLY_SET

    # ---- flags defined as (1UL << n) ----
    const unsigned long KVM_SYNC_X86_REGS
    const unsigned long KVM_SYNC_X86_SREGS
    const unsigned long KVM_SYNC_X86_EVENTS
    const unsigned long KVM_MEM_LOG_DIRTY_PAGES
    const unsigned long KVM_MEM_READONLY
    const unsigned long KVM_DIRTY_GFN_F_DIRTY
    const unsigned long KVM_DIRTY_GFN_F_RESET

    # ---- ioctl request numbers (_IO/_IOR/_IOW/_IOWR: unsigned, above INT_MAX for _IOR) ----
    const unsigned long KVM_GET_API_VERSION
    const unsigned long KVM_GET_MSR_INDEX_LIST
    const unsigned long KVM_CREATE_VM
    const unsigned long KVM_CHECK_EXTENSION
    const unsigned long KVM_GET_VCPU_MMAP_SIZE
    const unsigned long KVM_GET_SUPPORTED_CPUID
    const unsigned long KVM_CREATE_VCPU
    const unsigned long KVM_GET_DIRTY_LOG
    const unsigned long KVM_SET_USER_MEMORY_REGION
    const unsigned long KVM_SET_TSS_ADDR
    const unsigned long KVM_RUN
    const unsigned long KVM_GET_REGS
    const unsigned long KVM_SET_REGS
    const unsigned long KVM_GET_SREGS
    const unsigned long KVM_SET_SREGS
    const unsigned long KVM_GET_MSRS
    const unsigned long KVM_SET_MSRS
    const unsigned long KVM_GET_FPU
    const unsigned long KVM_SET_FPU
    const unsigned long KVM_SET_CPUID2
    const unsigned long KVM_GET_VCPU_EVENTS
    const unsigned long KVM_SET_VCPU_EVENTS
    const unsigned long KVM_GET_DEBUGREGS
    const unsigned long KVM_SET_DEBUGREGS
    const unsigned long KVM_ENABLE_CAP
    const unsigned long KVM_GET_TSC_KHZ
    const unsigned long KVM_GET_XSAVE
    const unsigned long KVM_SET_XSAVE
    const unsigned long KVM_GET_XCRS
    const unsigned long KVM_SET_XCRS
    const unsigned long KVM_RESET_DIRTY_RINGS
    const unsigned long KVM_CLEAR_DIRTY_LOG
    const unsigned long KVM_X86_SET_MSR_FILTER

    # ---- register state (x86, <asm/kvm.h>); fields listed only where hlpool reads them ----
    struct kvm_regs:
        uint64_t rax
        uint64_t rip
        uint64_t rflags

    struct kvm_segment:
        uint64_t base
        uint32_t limit
        uint16_t selector

    struct kvm_dtable:
        uint64_t base
        uint16_t limit

    struct kvm_sregs:
        kvm_segment cs
        kvm_dtable gdt
        uint64_t cr0
        uint64_t cr3
        uint64_t cr4
        uint64_t efer

    struct kvm_vcpu_events:
        uint32_t flags

    struct kvm_fpu:
        uint32_t mxcsr

    struct kvm_xsave:
        pass

    struct kvm_xcr:
        uint32_t xcr
        uint64_t value

    struct kvm_xcrs:
        uint32_t nr_xcrs
        uint32_t flags

    struct kvm_debugregs:
        uint64_t dr6
        uint64_t dr7

    struct kvm_msr_entry:
        uint32_t index
        uint64_t data

    struct kvm_msrs:  # header of a variable-length struct (entries[] follow)
        uint32_t nmsrs

    struct kvm_msr_list:  # header of a variable-length struct (indices[] follow)
        uint32_t nmsrs

    struct kvm_msr_filter_range:
        uint32_t flags
        uint32_t nmsrs
        uint32_t base
        uint8_t *bitmap

    struct kvm_msr_filter:  # flags, then ranges[KVM_MSR_FILTER_MAX_RANGES]
        uint32_t flags

    struct kvm_cpuid_entry2:
        uint32_t function
        uint32_t index

    struct kvm_cpuid2:  # header of a variable-length struct (entries[] follow)
        uint32_t nent

    struct kvm_userspace_memory_region:
        uint32_t slot
        uint32_t flags
        uint64_t guest_phys_addr
        uint64_t memory_size
        uint64_t userspace_addr

    struct kvm_enable_cap:
        uint32_t cap
        uint32_t flags

    # struct kvm_sync_regs (<asm/kvm.h>): what KVM_CAP_SYNC_REGS shares through kvm_run.s.
    struct kvm_sync_regs:
        kvm_regs regs
        kvm_sregs sregs
        kvm_vcpu_events events

    # ---- struct kvm_run ----
    # Its exit union and the union around the sync regs are anonymous C types, and
    # Cython cannot declare an anonymous member; these typedefs name them with
    # __typeof__ (gcc/clang) so Cython can refer to them. ``io`` below is a member of
    # the anonymous union, which C reaches as ``run->io``.
    ctypedef struct kvm_run_io "__typeof__(((struct kvm_run *)0)->io)":
        uint8_t direction
        uint8_t size
        uint16_t port
        uint32_t count
        uint64_t data_offset

    ctypedef union kvm_run_s "__typeof__(((struct kvm_run *)0)->s)":
        kvm_sync_regs regs

    struct kvm_run:
        uint8_t request_interrupt_window
        uint8_t immediate_exit
        uint32_t exit_reason
        kvm_run_io io
        uint64_t kvm_valid_regs
        uint64_t kvm_dirty_regs
        kvm_run_s s

    # ---- dirty logging ----
    struct kvm_dirty_log:
        uint32_t slot
        uint32_t padding1
        void *dirty_bitmap  # in an anonymous union with a u64 (so the struct is 16 bytes on any ABI)

    # KVM_CLEAR_DIRTY_LOG (manual protect): clear these bits, write-protect those pages again.
    struct kvm_clear_dirty_log:
        uint32_t slot
        uint32_t num_pages
        uint64_t first_page
        void *dirty_bitmap  # in an anonymous union with a u64

    # One entry of a vCPU's dirty ring (mapped at KVM_DIRTY_LOG_PAGE_OFFSET pages).
    struct kvm_dirty_gfn:
        uint32_t flags
        uint32_t slot
        uint64_t offset
