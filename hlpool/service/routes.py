"""The route table: every route once, with its handler, bodies and error codes.

:mod:`.app` serves these routes and :mod:`.openapi` describes them; neither
lists routes of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hlpool.service.schema import (
    REGISTER_BODIES,
    CallRequest,
    CallResult,
    FunctionName,
    GarbageCollected,
    Health,
    Index,
    Readiness,
    Removed,
    SnapshotInfo,
    SnapshotList,
    SnapshotName,
)


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: str  # the name of the :class:`~hlpool.service.handlers.Service` method that answers
    operation_id: str
    summary: str
    response: Any  # the type of the success body (a Struct; dict or str for the free-form ones)
    response_description: str
    status: int = 200
    request: tuple[type, ...] = ()  # JSON request bodies (more than one: any of them)
    request_required: bool = True
    upload: bool = False  # the body is a guest ELF (one of UPLOAD_TYPES)
    errors: tuple[str, ...] = ()  # the error codes it answers with (unauthorized too, with a token, unless public)
    public: bool = False  # answered without a token
    media_type: str = "application/json"
    other_statuses: tuple[tuple[int, str], ...] = ()  # more statuses with the same body
    description: str | None = None  # may name {call_timeout} and {max_body}: this server's values


#: The types of the ``{...}`` parts of the paths.
PATH_PARAMETERS = {"name": SnapshotName, "function": FunctionName}

_CALL_ERRORS = ("bad_json", "bad_request", "unknown_snapshot", "unknown_function", "request_timeout",
                "payload_too_large", "guest_error", "overloaded", "guest_fault", "worker_crashed",
                "host_function_error", "shutting_down", "timeout", "internal")
_DERIVE_ERRORS = ("guest_error", "guest_fault", "host_function_error", "timeout")
_REGISTER_ERRORS = ("bad_request", "snapshot_exists", "request_timeout", "payload_too_large", "snapshot_error",
                    "overloaded", "shutting_down")

ROUTES: tuple[Route, ...] = (
    Route("GET", "/", "index", "index", "Service index", Index, "links"),
    Route("GET", "/healthz", "healthz", "healthz", "Liveness: the process is up (needs no token)", Health, "up",
          public=True),
    Route("GET", "/readyz", "readyz", "readyz", "Readiness: every worker alive and not shutting down", Readiness,
          "ready", other_statuses=((503, "not ready"),)),
    Route("GET", "/metrics", "prometheus", "metrics", "Prometheus metrics", str, "Prometheus text exposition format",
          media_type="text/plain"),
    Route("GET", "/openapi.json", "openapi", "openapi", "This document", dict, "OpenAPI 3.1"),
    Route("GET", "/v1/snapshots", "list_snapshots", "listSnapshots", "List the snapshots served", SnapshotList,
          "snapshots"),
    Route("POST", "/v1/snapshots", "register", "registerSnapshot",
          "Register a guest ELF or .hlsnap file on the server host, a JavaScript/Lua script, or a snapshot "
          "derived from a served one", SnapshotInfo, "registered", status=201, request=REGISTER_BODIES,
          errors=("bad_json", "forbidden", "unknown_snapshot", "unknown_function", *_REGISTER_ERRORS,
                                                 *_DERIVE_ERRORS),
          description="A path (and each of a derived snapshot's map_files) must lie (symbolic links resolved) in "
                      "a directory the server allows with --allow-dir; without one, registration by path is off "
                      "(403 forbidden). A file must be a regular file of at most {max_body} bytes. A derived "
                      "snapshot (a body with base, calls, map_files, retain) runs its calls in a "
                      "builder process keeping their state, each within {call_timeout:g} s; every call into it "
                      "then starts from that state. A call's error answers as the call would (guest_error, "
                      "timeout...), and nothing is registered."),
    Route("DELETE", "/v1/snapshots/{name}", "remove", "removeSnapshot", "Stop serving a snapshot and delete its "
          "store file", Removed, "removed", errors=("unknown_snapshot", "snapshot_in_use", "shutting_down"),
          description="Refused (409 snapshot_in_use) while a layered snapshot in the store names it as its "
                      "parent, or calls for it are queued or running. The file stays while another name serves "
                      "it or another process uses it (deleted: false)."),
    Route("POST", "/v1/store/gc", "collect_garbage", "collectGarbage",
          "Delete the snapshot store's files that nothing served, no layered child and no other process needs",
          GarbageCollected, "collected", errors=("shutting_down",)),
    Route("GET", "/v1/snapshots/{name}", "get_snapshot", "getSnapshot", "Describe a snapshot", SnapshotInfo,
          "the snapshot", errors=("unknown_snapshot",)),
    Route("PUT", "/v1/snapshots/{name}", "upload", "uploadSnapshot", "Register an uploaded guest ELF as NAME",
          SnapshotInfo, "registered", status=201, upload=True, errors=_REGISTER_ERRORS,
          description="The body is the ELF (`hlpool guest build`), at most {max_body} bytes."),
    Route("POST", "/v1/snapshots/{name}/calls/{function}", "call", "call",
          "Call a function in a fresh sandbox of the snapshot", CallResult, "the function's result",
          request=(CallRequest,), request_required=False, errors=_CALL_ERRORS,
          description="A call runs at most {call_timeout:g} s here (a request may ask for less); request "
                      "bodies are limited to {max_body} bytes."),
)
