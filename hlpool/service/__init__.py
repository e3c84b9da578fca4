"""The HTTP service (``hlpool serve``) and its client.

Routes (JSON everywhere; the OpenAPI 3.1 description is ``GET /openapi.json``)::

    GET  /healthz                                   the process is up (never needs a token)
    GET  /readyz                                    every worker alive and not shutting down (else 503)
    GET  /metrics                                   Prometheus text format
    GET  /openapi.json                              this API
    GET  /v1/snapshots                              the snapshots served
    GET  /v1/snapshots/{name}                       one of them
    POST /v1/snapshots                              register: {"name", "path"} (under an --allow-dir) or a script
    PUT  /v1/snapshots/{name}                       register an uploaded guest ELF (the body)
    POST /v1/snapshots/{name}/calls/{function}      {"args": [...], "timeout": s} -> {"result": ...}

Errors are ``{"error": {"code", "message"[, "details"]}}`` with a stable code.
Safe defaults: binds 127.0.0.1; a bearer token (``--token``/``HLPOOL_TOKEN``)
guards everything but /healthz, and binding a non-loopback address without one
is refused unless ``--insecure``; request bodies are limited (``--max-body``)
and so is the time to send a request (``--header-timeout``, ``--body-timeout``);
every call has a deadline (``--call-timeout`` is the default and the maximum);
files are registered by path only from directories given with ``--allow-dir``.

The modules, lowest first: :mod:`.jsonvalues` (values <-> JSON),
:mod:`.api_errors` (codes, statuses, exception -> API error), :mod:`.schema`
(the bodies as msgspec Structs), :mod:`.routes` (the route table),
:mod:`.openapi` (the document, derived from both), :mod:`.config`
(ServerConfig), :mod:`.metrics`, :mod:`.snapshots` (the snapshots served),
:mod:`.names` (the names shared by front ends), :mod:`.handlers` (Service),
:mod:`.app` (aiohttp app and middleware), :mod:`.serve` (process lifecycle),
:mod:`.frontends` (``--frontends K``: a supervisor of K front-end processes);
:mod:`.client` needs only the standard library.

May import: :mod:`hlpool.pool` and everything below it.
"""
