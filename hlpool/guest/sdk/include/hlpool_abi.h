/*
 * hlpool_abi.h - the contract between the hlpool host and the guest runtime.
 *
 * This one header is compiled into every guest and parsed by the host
 * (hlpool/guest/abi.py reads every `#define HL_...` line below), so the two sides
 * cannot drift apart. Keep it to plain `#define NAME value` lines and
 * fixed-layout structs of 64-bit fields; the host mirrors the structs by
 * field order.
 *
 * Everything the guest writes is untrusted: the host bounds-checks every
 * length, offset and pointer it reads from guest memory.
 */
#ifndef HLPOOL_ABI_H
#define HLPOOL_ABI_H

/* Version of this contract; bumped whenever a struct or constant changes. */
#define HL_ABI_VERSION 2

#define HL_PAGE_SIZE 4096

/* The guest signals the host with `outl %eax, $HL_PORT`; eax holds an HL_EV_ code. */
#define HL_PORT 0x3f0

/* Events (the value written to HL_PORT). */
#define HL_EV_INIT_DONE 1 /* hl_main returned; OUT holds the init record */
#define HL_EV_RESULT 2    /* a call finished; OUT holds the result record */
#define HL_EV_HOSTCALL 3  /* OUT holds a host-call request; host answers in REPLY */
/* ("OUT" below means the record whose header is on the call page.) */
#define HL_EV_LOG_FULL 4  /* the log buffer is full; host drains it and resumes */
#define HL_EV_FAULT 5     /* CPU exception; OUT holds the fault record */
#define HL_EV_RANDOM 6    /* getrandom(): OUT header aux0 = bytes wanted; host fills REPLY */

/* Record kinds (hl_msg_header.kind). */
#define HL_MSG_CALL 1        /* IN: call request; payload = msgpack array of arguments */
#define HL_MSG_OK 2          /* OUT: call result; payload = one msgpack value */
#define HL_MSG_GUEST_ERROR 3 /* OUT: hl_error(); payload = UTF-8 message */
#define HL_MSG_CALL_ERROR 4  /* OUT: bad arguments etc.; payload = UTF-8 message */
#define HL_MSG_EXIT 5        /* OUT: guest called exit(); aux0 = status */
#define HL_MSG_SIGNAL 6      /* OUT: guest raised a signal (abort()); aux0 = signal */
#define HL_MSG_INIT 7        /* OUT: init record; aux0 = hl_main() return value;
                                payload = msgpack array of exported names */
#define HL_MSG_HOSTCALL 8    /* OUT: payload = msgpack [name, [args...]] */
#define HL_MSG_REPLY_OK 9    /* REPLY: payload = one msgpack value */
#define HL_MSG_FAULT 11      /* OUT: aux0 = vector, aux1 = error code, aux2 = rip, aux3 = cr2;
                                payload = 8-byte rsp */
#define HL_MSG_RANDOM 12     /* OUT: request, aux0 = length; REPLY: payload = random bytes */

/* Magic value at the start of every record ("HLMS"). */
#define HL_MSG_MAGIC 0x534d4c48

#ifndef __ASSEMBLER__
/* Header of every record in IN, REPLY and OUT. Payload bytes follow it. */
struct hl_msg_header {
    unsigned long long magic;   /* HL_MSG_MAGIC */
    unsigned long long kind;    /* HL_MSG_* */
    unsigned long long length;  /* payload bytes after the header */
    unsigned long long aux0;    /* kind-specific */
    unsigned long long aux1;
    unsigned long long aux2;
    unsigned long long aux3;
    unsigned long long aux4;
};
#endif
#define HL_MSG_HEADER_SIZE 64

/*
 * The call page: one page the guest writes on every call, kept out of dirty
 * logging and restored wholesale (with the top of the stack) after each call.
 * It holds the header of every OUT record, small payloads inline, and the
 * runtime's per-call state. A record's payload is inline (right after the
 * header) when its length is at most HL_INLINE_MAX, otherwise at out_base.
 */
#define HL_CALL_PAGE_OUT_HEADER 0
#define HL_CALL_PAGE_INLINE 64
#define HL_INLINE_MAX 1984
#define HL_CALL_PAGE_RUNTIME 2048

/* IN (call request) uses the aux fields as follows. */
#define HL_CALL_AUX_FUNCTION 0 /* aux0: index of the exported function */
#define HL_CALL_AUX_TIME_NS 1  /* aux1: host CLOCK_REALTIME in ns when the call started;
                                  the guest pairs it with its own TSC when it starts */

/* The log buffer: a 16-byte header then bytes. The guest appends, the host drains. */
#ifndef __ASSEMBLER__
struct hl_log_header {
    unsigned long long used;    /* bytes of log data after the header */
    unsigned long long dropped; /* bytes the guest could not fit (reported by the host) */
};
#endif
#define HL_LOG_HEADER_SIZE 16

/* Boot information the host writes (read-only to the guest) before hl_main runs. */
#define HL_BOOT_MAGIC 0x544f4f424c48 /* "HLBOOT" */
#ifndef __ASSEMBLER__
struct hl_boot_info {
    unsigned long long magic;        /* HL_BOOT_MAGIC */
    unsigned long long abi_version;  /* HL_ABI_VERSION */
    unsigned long long image_base;   /* where the ELF image was loaded */
    unsigned long long image_size;
    unsigned long long phdr;         /* guest address of the program headers */
    unsigned long long phnum;
    unsigned long long phent;
    unsigned long long heap_base;    /* brk/mmap arena */
    unsigned long long heap_size;
    unsigned long long stack_base;   /* lowest usable stack byte (guard page below) */
    unsigned long long stack_size;
    unsigned long long in_base;      /* call requests (read-only to the guest) */
    unsigned long long in_size;
    unsigned long long reply_base;   /* host-call replies (read-only to the guest) */
    unsigned long long reply_size;
    unsigned long long out_base;     /* payloads of results and requests longer than HL_INLINE_MAX */
    unsigned long long out_size;
    unsigned long long log_base;     /* log buffer (hl_log_header + data) */
    unsigned long long log_size;
    unsigned long long tsc_khz;      /* TSC frequency, for clock_gettime */
    unsigned long long files_base;   /* window where host files are mapped read-only */
    unsigned long long files_size;
    unsigned long long files_table;  /* guest address of the mapped-files table */
    unsigned long long call_page;    /* the call page (see HL_CALL_PAGE_*) */
    unsigned long long reserved[8];
};
#endif

/* The mapped-files table (read-only to the guest, updated by the host). */
#define HL_FILES_MAX 63
#ifndef __ASSEMBLER__
struct hl_file_entry {
    unsigned long long guest_address; /* 0: unused slot */
    unsigned long long size;
    char name[48];                    /* basename of the host file, NUL-terminated */
};
struct hl_files_table {
    unsigned long long count;
    unsigned long long generation;
    struct hl_file_entry entries[HL_FILES_MAX];
};
#endif

/* Value type tags returned by hl_arg_type() and stored in hl_value.type. */
#define HL_TYPE_NONE 0
#define HL_TYPE_BOOL 1
#define HL_TYPE_INT 2
#define HL_TYPE_FLOAT 3
#define HL_TYPE_STR 4
#define HL_TYPE_BYTES 5
#define HL_TYPE_LIST 6
#define HL_TYPE_DICT 7
#define HL_TYPE_ERROR 8 /* internal: a pending hl_error() result */
#define HL_TYPE_MISSING 9 /* internal: hl_arg_type() of an index past the end */

/* Exported function names are at most this many bytes. */
#define HL_NAME_MAX 63
/* At most this many exports per guest. */
#define HL_EXPORTS_MAX 256
/* Nesting limit for list/dict values in either direction. */
#define HL_MAX_DEPTH 32

#endif /* HLPOOL_ABI_H */
