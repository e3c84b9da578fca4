"""Defaults that more than one layer uses, in one place.

Each layer imports its defaults from here (the pool, the server, the client and
the CLI's ``--help`` texts all quote the same numbers).
"""

#: Deadline of one guest call, seconds (Sandbox, Pool and the HTTP service).
CALL_TIMEOUT = 10.0
#: Deadline of a guest's initialisation (``hl_main``) when a snapshot is built, seconds.
INIT_TIMEOUT = 30.0
#: Guest log bytes kept per call before the rest is dropped.
MAX_LOG_BYTES = 1 << 20
#: Host calls one guest call may make.
MAX_HOST_CALLS = 100_000
#: Calls queued or running in a Pool before submit() blocks (or the server answers 429).
MAX_PENDING = 1024
#: The HTTP service's address.
HOST = "127.0.0.1"
PORT = 8470
URL = f"http://{HOST}:{PORT}"
#: Largest HTTP request body, bytes.
MAX_BODY = 8 << 20
#: Seconds SIGTERM waits for calls in flight before the server stops.
SHUTDOWN_GRACE = 10.0
#: The interpreter guests scripts can be written for.
SCRIPT_LANGUAGES = ("js", "lua")
#: Seconds the HTTP service waits for a request's headers (from the connection's start, or from the
#: previous answer on a kept-alive connection; so also how long an idle connection stays open).
HEADER_TIMEOUT = 10.0
#: Seconds the HTTP service waits for a request's whole body once its headers arrived.
BODY_TIMEOUT = 30.0
#: Snapshot registrations the HTTP service builds at once; more are answered 429 overloaded.
MAX_REGISTRATIONS = 4
#: Wall-clock limit of one snapshot build (an ELF's ``hl_main``, a script's loading), seconds.
BUILD_TIMEOUT = 60.0
#: Memory a snapshot builder process may add to what it started with (resident anon + shmem), bytes.
BUILD_MEMORY = 1 << 30
#: Largest guest memory (system + main + io slots) a pool accepts for a snapshot, bytes.
MAX_GUEST_MEMORY = 1 << 30
#: Bytes the snapshot files of a pool's store may take (garbage is collected first).
STORE_QUOTA = 16 << 30
#: Snapshot builds a pool runs at once (more wait for a free slot).
MAX_BUILDS = 4
#: The layout areas a derived snapshot may keep from its parent (``retain``; see hlpool.snapshot.regions).
SNAPSHOT_AREAS = ("system", "image", "heap", "stack", "exception_stack", "out", "log", "call", "guard", "input",
                  "file")
