"""The service's metrics in Prometheus' text exposition format (version 0.0.4), with no client library: requests by
route and status, a latency histogram, a batch-size histogram, the queue depth and the requests in flight."""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Callable, Sequence

# Seconds: a MobileNet answers in tens of milliseconds, a ResNet-101 at 513 in about a second on 2 cores.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    """A cumulative Prometheus histogram: counts per upper bound, the sum and the count."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out, running = [], 0
        for bound, n in zip([*map(_number, self.buckets), "+Inf"], self.counts):
            running += n
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {running}')
        braces = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{braces} {self.total:.6f}", f"{name}_count{braces} {self.count}"]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Metrics:
    """Counters the app updates (from the event loop and the model thread, hence the lock) and renders."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency = Histogram(LATENCY_BUCKETS)
        self.model_seconds = Histogram(LATENCY_BUCKETS)
        self.batches = Histogram(BATCH_BUCKETS)
        self.in_flight = 0

    def request_done(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, status)] += 1
            if route.startswith(("/v1/segment", "/v2/models")):
                self.latency.observe(seconds)

    def batch_done(self, size: int, seconds: float) -> None:
        with self._lock:
            self.batches.observe(size)
            self.model_seconds.observe(seconds)

    def render(self, *, queue_depth: Callable[[], int]) -> str:
        with self._lock:
            lines = ["# HELP deeplab_requests_total HTTP requests answered, by route and status.",
                     "# TYPE deeplab_requests_total counter"]
            lines += [f'deeplab_requests_total{{route="{route}",status="{status}"}} {n}'
                      for (route, status), n in sorted(self.requests.items())]
            lines += ["# HELP deeplab_request_seconds Time from a segmentation request's arrival to its answer.",
                      "# TYPE deeplab_request_seconds histogram", *self.latency.lines("deeplab_request_seconds"),
                      "# HELP deeplab_batch_size Requests run together in one network call.",
                      "# TYPE deeplab_batch_size histogram", *self.batches.lines("deeplab_batch_size"),
                      "# HELP deeplab_batch_seconds Time one batch took on the model, decoding excluded.",
                      "# TYPE deeplab_batch_seconds histogram", *self.model_seconds.lines("deeplab_batch_seconds"),
                      "# HELP deeplab_queue_depth Requests waiting for the model.",
                      "# TYPE deeplab_queue_depth gauge", f"deeplab_queue_depth {queue_depth()}",
                      "# HELP deeplab_in_flight Segmentation requests being answered.",
                      "# TYPE deeplab_in_flight gauge", f"deeplab_in_flight {self.in_flight}"]
        return "\n".join(lines) + "\n"
