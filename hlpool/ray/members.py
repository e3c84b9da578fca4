"""The cluster's nodes and the hlpool actor on each: who joined, who is gone.

:class:`Members` asks Ray for its nodes (``ray.nodes()``) at start, every
``poll_interval`` seconds and whenever a call finds its node gone. On each live node
that has no hlpool actor it creates one (:class:`~hlpool.ray.node.NodeHost`, pinned by
``NodeAffinitySchedulingStrategy(soft=False)``) and, once the actor answers, hands the
node to the pool. A node Ray reports dead, or whose actor died, is taken away from the
pool (its in-flight calls fail, see :class:`~hlpool.errors.NodeLostError`); if the node
is still alive its actor is created again.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any, Callable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from hlpool.ray.node import NodeHost

log = logging.getLogger(__name__)

# What a call's reference raises when its node or actor is gone (ActorDiedError is a RayActorError).
ACTOR_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.NodeDiedError,
                ray.exceptions.ObjectLostError)

_actor_class: Any = None


def _node_host_class() -> Any:
    global _actor_class
    if _actor_class is None:
        _actor_class = ray.remote(NodeHost)
    return _actor_class


def alive_nodes() -> dict[str, dict[str, Any]]:
    """Ray's live nodes by node id (those with resources: a node started with none still counts)."""
    return {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}


class Members:
    """Keeps one NodeHost actor per live node; tells the pool about joins and losses."""

    def __init__(self, make_actor_args: Callable[[str], tuple], actor_options: dict[str, Any],
                 on_join: Callable[[str, Any, dict], None], on_loss: Callable[[str, str], None],
                 known: Callable[[], set[str]], poll_interval: float, start_timeout: float) -> None:
        self._args = make_actor_args
        self._options = dict(actor_options)
        self._on_join = on_join
        self._on_loss = on_loss
        self._known = known
        self.poll_interval = poll_interval
        self.start_timeout = start_timeout
        self._starting: dict[str, tuple[Any, Any, float]] = {}  # node id -> (actor, info ref, since)
        self._failed: dict[str, float] = {}  # node id -> when its last actor start failed
        # node id -> why its last actor start failed (the error its constructor raised, or a timeout)
        self.start_errors: dict[str, str] = {}
        self._refused: set[str] = set()  # nodes whose actor's constructor raised (not a timeout)
        self._live: set[str] = set()  # the live nodes at the last look
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.actor_starts = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hlpool-ray-members", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look at the cluster now (a call found its node gone)."""
        self._wake.set()

    def stop(self) -> list[Any]:
        """Stop watching; returns the actors still starting (the caller kills them)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        starting = [actor for actor, _ref, _since in self._starting.values()]
        self._starting.clear()
        return starting

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:  # Ray unreachable for a moment: try again at the next poll
                log.exception("cannot read the cluster's nodes")
            self._wake.wait(self.poll_interval if not self._starting else min(self.poll_interval, 0.2))
            self._wake.clear()

    def refresh(self) -> None:
        """One look at the cluster: losses, joins, actors that finished starting."""
        live = alive_nodes()
        self._live = set(live)
        for node_id in self._known() - set(live):
            self._on_loss(node_id, "Ray reports the node dead")
        for node_id, (actor, _ref, _since) in list(self._starting.items()):
            if node_id not in live:
                del self._starting[node_id]
                _kill(actor)
        now = time.monotonic()
        known = self._known()
        for node_id in live:
            if node_id in known or node_id in self._starting or now - self._failed.get(node_id, -1e9) < 5.0:
                continue
            if self._stop.is_set():
                return
            options = dict(self._options)
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
            actor = _node_host_class().options(**options).remote(*self._args(node_id))
            self.actor_starts += 1
            self._starting[node_id] = (actor, actor.info.remote(), now)
            log.info("starting the hlpool actor on node %s", node_id[:12])
        self._collect_started()

    def _collect_started(self) -> None:
        if not self._starting:
            return
        refs = {ref: node_id for node_id, (_a, ref, _s) in self._starting.items()}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        for ref in ready:
            node_id = refs[ref]
            actor, _ref, _since = self._starting.pop(node_id)
            try:
                info = ray.get(ref)
            except Exception as exc:
                reason = start_error(exc)
                log.error("the hlpool actor on node %s did not start: %s", node_id[:12], reason)
                self._failed[node_id] = time.monotonic()
                self.start_errors[node_id] = reason
                if getattr(exc, "actor_init_failed", False):
                    self._refused.add(node_id)
                _kill(actor)
                continue
            self.start_errors.pop(node_id, None)
            self._refused.discard(node_id)
            self._on_join(node_id, actor, info)
        now = time.monotonic()
        for node_id, (actor, _ref, since) in list(self._starting.items()):
            if now - since > self.start_timeout:
                log.error("the hlpool actor on node %s did not start within %g s", node_id[:12], self.start_timeout)
                del self._starting[node_id]
                self._failed[node_id] = now
                self.start_errors[node_id] = f"its hlpool actor did not start within {self.start_timeout:g} s"
                _kill(actor)

    def wait_for(self, count: int, timeout: float) -> bool:
        """Block until ``count`` nodes joined (refreshing meanwhile), or ``timeout`` passed; False if
        it gave up early: the cluster has ``count`` live nodes, and each of them that has not joined
        refused its actor (the actor's constructor raised, e.g. no /dev/kvm there: see
        :attr:`start_errors`), so waiting would only see the same start fail again. With fewer live
        nodes it waits for more to come."""
        deadline = time.monotonic() + timeout
        while len(self._known()) < count and time.monotonic() < deadline:
            self.refresh()
            if len(self._known()) < count:
                waiting = self._live - self._known()
                if len(self._live) >= count and waiting and not self._starting and waiting <= self._refused:
                    return False
                time.sleep(0.1)
        return True


def start_error(exc: BaseException) -> str:
    """What made an actor's start fail, in a line: for an error its constructor raised, the last line of
    Ray's report (``module.Error: message``, the traceback before it left out); else the exception itself."""
    if getattr(exc, "actor_init_failed", False):
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(getattr(exc, "error_msg", "") or exc))  # Ray's colours
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return f"{type(exc).__name__}: {exc}"


def _kill(actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:
        pass
