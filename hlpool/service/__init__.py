"""The HTTP service (``hlpool serve``) and its client.

May import: :mod:`hlpool.pool` and everything below it.
"""
