"""How long the matcher's replies took: receipt stamp to reply sent, per sequenced request.

Every request the gateway queues for the matcher carries its receipt time (`ts_ns`, stamped
as it was read off the socket). When the reply (ack, reject, canceled, amended, done) is
handed to the ROUTER - at once with fast acks, when it leaves the durable hold with durable
ones - the wait goes into a histogram with the buckets of `perpx_ack_latency_seconds`. The
gateway writes the histogram into its stats file once a second; the supervisor's exporter
(perpx/metrics.py) adds the gateways' up. Measured here, beside the send, it includes what a
reader of shared memory cannot see: the gateway's own queues and the durable hold.

Cost on the order path: a deque append and pop per reply, one clock read per batch of
replies; the bucketing is numpy, once a second or every FOLD_AT replies. The compiled lane
(gateway/compiled_pass.py `route_pass`) counts the fast replies it sends itself, a clock read
and a bucket each, into the same `counts` and `sum_ns` arrays. FOLD_AT keeps each
fold small: one fold of a second's replies at 20k orders/s took ~0.7 ms of the serving thread
in one go (every reply in flight waited for it); 1,024 take ~25 µs.
"""

from __future__ import annotations

from collections import deque

import numpy as np

# seconds, Prometheus `le` bounds; a durable ack on this box is ~1-3 ms, a stall shows in the
# top buckets
ACK_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
FOLD_AT = 1 << 10       # waits kept unbucketed at most


class AckLatency:
    def __init__(self):
        self.bounds_ns = np.array([round(b * 1e9) for b in ACK_BUCKETS_S], np.int64)
        # per bucket, the last one above every bound (+Inf); cumulative since the gateway began
        self.counts = np.zeros(len(ACK_BUCKETS_S) + 1, np.int64)
        self.sum_ns = np.zeros(1, np.int64)      # an array: the lane adds to it too
        self.unsent: deque[tuple[int, int]] = deque()   # (seq, receipt ts_ns) of replies
        self._waits_ns: list[int] = []

    def replied(self, seq: int, received_ns: int) -> None:
        """The reply to a request received at `received_ns` is caused by event `seq`."""
        self.unsent.append((seq, received_ns))

    def sent_upto(self, seq: int, now_ns: int) -> None:
        """The replies of events up to `seq` went out at `now_ns`."""
        unsent = self.unsent
        waits = self._waits_ns
        while unsent and unsent[0][0] <= seq:
            waits.append(now_ns - unsent.popleft()[1])
        if len(waits) >= FOLD_AT:
            self.fold()

    def fold(self) -> None:
        """Put the waits gathered so far into the buckets."""
        if not self._waits_ns:
            return
        waits = np.maximum(np.array(self._waits_ns, np.int64), 0)
        self._waits_ns.clear()
        # a wait equal to a bound belongs to that bucket (Prometheus' `le`)
        self.counts += np.bincount(np.searchsorted(self.bounds_ns, waits),
                                   minlength=len(self.counts))
        self.sum_ns[0] += int(waits.sum())

    def stats(self) -> dict:
        """For the stats file: `counts` per bucket of `le_s` (the last above them all) and
        `sum_s`, since the gateway started."""
        self.fold()
        return {"le_s": list(ACK_BUCKETS_S), "counts": self.counts.tolist(),
                "sum_s": int(self.sum_ns[0]) / 1e9}
