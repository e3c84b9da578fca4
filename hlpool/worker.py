"""The worker process's loop (kept at this path by the product design; the code is in
:mod:`hlpool.pool.worker`)."""

from hlpool.pool.worker import SandboxCache, WorkerConfig, error_blob, serve  # noqa: F401
