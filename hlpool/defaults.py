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
