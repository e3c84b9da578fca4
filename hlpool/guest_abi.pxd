# The guest/host contract for Cython, taken from the SDK header
# ``hlpool/guest/sdk/include/hlpool_abi.h`` (setup.py puts that directory on the
# include path). The same header is compiled into every guest and parsed by
# ``hlpool/guest/abi.py`` for Python, so all three agree by construction;
# ``tests/test_contracts.py`` checks the Python side against the sizes and
# offsets the C compiler sees (``hlpool._mapping.guest_header_values()``).
#
# Names are declarations, not values: every number comes from the header.

cdef extern from "hlpool_abi.h" nogil:
    enum:
        HL_ABI_VERSION
        HL_PAGE_SIZE
        HL_PORT
        HL_MSG_HEADER_SIZE
        HL_LOG_HEADER_SIZE
        HL_CALL_PAGE_INLINE
        HL_INLINE_MAX
        HL_FILES_MAX
        HL_NAME_MAX

    const unsigned long long HL_MSG_MAGIC
    const unsigned long long HL_BOOT_MAGIC

    # Header of every record in IN, REPLY and OUT; the payload follows it.
    struct hl_msg_header:
        unsigned long long magic
        unsigned long long kind
        unsigned long long length
        unsigned long long aux0
        unsigned long long aux1
        unsigned long long aux2
        unsigned long long aux3
        unsigned long long aux4

    struct hl_log_header:
        unsigned long long used
        unsigned long long dropped

    # Named fields listed so the contract test can check each one's offset against
    # the field order hlpool/guest/abi.py packs (BOOT_INFO_FIELDS).
    struct hl_boot_info:
        unsigned long long magic
        unsigned long long abi_version
        unsigned long long image_base
        unsigned long long image_size
        unsigned long long phdr
        unsigned long long phnum
        unsigned long long phent
        unsigned long long heap_base
        unsigned long long heap_size
        unsigned long long stack_base
        unsigned long long stack_size
        unsigned long long in_base
        unsigned long long in_size
        unsigned long long reply_base
        unsigned long long reply_size
        unsigned long long out_base
        unsigned long long out_size
        unsigned long long log_base
        unsigned long long log_size
        unsigned long long tsc_khz
        unsigned long long files_base
        unsigned long long files_size
        unsigned long long files_table
        unsigned long long call_page
        # (then reserved[]: covered by the size check)

    struct hl_file_entry:
        unsigned long long guest_address
        unsigned long long size
        # (then char name[]: covered by the size check)

    struct hl_files_table:
        unsigned long long count
        unsigned long long generation
        # (then entries[HL_FILES_MAX]: covered by the size check)
