"""The ``hlpool`` command line: guest builds, snapshots, runs, the server and its client.

May import: anything in hlpool (it is the top).
"""

from hlpool.cli.main import main

__all__ = ["main"]
