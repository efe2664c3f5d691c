"""What the workers of a multi-worker run agree on through collectives; nothing on one process."""

from __future__ import annotations

import json
import logging
import zlib

import tensorflow as tf

log = logging.getLogger(__name__)


class ClusterError(Exception):
    """The workers disagree on something they must share (flags, data, checkpoint)."""


class ClusterUnavailable(Exception):
    """Not every worker came up, or one was lost: the run cannot go on until all are running."""


class Cluster:
    """Broadcasts the chief's values and agrees on flags, one scalar collective each.

    Every worker must make the same calls in the same order: a collective waits for all of
    them. On a single worker each call returns its own value without any collective.
    """

    def __init__(self, strategy: tf.distribute.Strategy, *, num_workers: int, worker_index: int):
        self.strategy, self.num_workers, self.worker_index = strategy, num_workers, worker_index
        if num_workers > 1:
            self._sum = tf.function(self._sum_fn)

    def _sum_fn(self, value, chief_only):
        def replica(v, only):
            context = tf.distribute.get_replica_context()
            # Replica 0 of the cluster lives on the chief: with chief_only, it alone contributes.
            first = tf.equal(context.replica_id_in_sync_group, 0)
            return tf.where(tf.logical_or(first, tf.logical_not(only)), v, tf.zeros_like(v))
        per_replica = self.strategy.run(replica, args=(value, chief_only))
        return self.strategy.reduce("SUM", per_replica, axis=None)

    def broadcast(self, value: int) -> int:
        """The chief's `value` (an integer below 2**53), on every worker."""
        if self.num_workers == 1:
            return value
        return int(self._sum(tf.constant(value, tf.float64), tf.constant(True)).numpy())

    def any(self, flag: bool) -> bool:
        """True on every worker if `flag` is True on any of them."""
        if self.num_workers == 1:
            return flag
        return float(self._sum(tf.constant(float(flag), tf.float64), tf.constant(False)).numpy()) > 0

    def together(self, what: str, fn):
        """Runs `fn` on every worker and returns its result; if it fails on any, fails on all.

        Without this, a worker whose data is missing would leave the others waiting in their
        next collective, for ever: a worker that is alive keeps the heartbeats going.

        Raises:
          The worker's own exception where it failed; ClusterError on the others.
        """
        try:
            result, error = fn(), None
        except Exception as e:  # noqa: BLE001 - re-raised below, on this worker as it was
            result, error = None, e
        if self.any(error is not None):
            raise error or ClusterError(f"another worker could not {what}; see its error")
        return result

    def check_same(self, what: str, value) -> None:
        """Refuses to go on unless every worker has the chief's `value` (JSON-able).

        Raises:
          ClusterError: on every worker that differs, naming `what` and the worker.
        """
        mine = zlib.crc32(json.dumps(value, sort_keys=True).encode())
        differs = mine != self.broadcast(mine)
        if self.any(differs):  # every worker asks, so every worker stops
            who = f"worker {self.worker_index}" if differs else "another worker"
            raise ClusterError(f"{who} has other {what} than the chief (worker 0); start every "
                               "worker with the same flags, data and run directory")
