"""Prometheus metrics on the daemon's own registry; labels are routes and outcomes, never node ids.

The event loop is the only writer, so the hot path keeps plain counters (no locks, one bisect per
request) and prometheus_client turns them into metric families when /metrics is scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
HEARTBEAT_OUTCOMES = ("ok", "unknown_node", "invalid")
PLACEMENT_OUTCOMES = ("placed", "model_not_available", "no_capacity", "invalid")


class _Latency:
    __slots__ = ("buckets", "total_s")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)  # the last one is +Inf
        self.total_s = 0.0


class Metrics(Collector):
    def __init__(
        self,
        count_by_status: Callable[[], dict[str, int]],
        pools_ready: Callable[[], int],
        heartbeat_writeback_passes: Callable[[], int],
    ) -> None:
        self._count_by_status = count_by_status
        self._pools_ready = pools_ready
        self._heartbeat_writeback_passes = heartbeat_writeback_passes
        self.registrations = 0
        self.heartbeats = dict.fromkeys(HEARTBEAT_OUTCOMES, 0)
        self.placements = dict.fromkeys(PLACEMENT_OUTCOMES, 0)
        self._latency: dict[tuple[str, str], _Latency] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def observe_request(self, method: str, route: str, seconds: float) -> None:
        latency = self._latency.get((method, route))
        if latency is None:
            latency = self._latency[(method, route)] = _Latency()
        latency.buckets[bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        latency.total_s += seconds

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator:
        nodes = GaugeMetricFamily("orchestratord_nodes", "Registered nodes by status", labels=["status"])
        for status, count in self._count_by_status().items():
            nodes.add_metric([status], count)
        yield nodes
        yield GaugeMetricFamily(
            "orchestratord_pools_ready",
            "Pools on online nodes that can take work now",
            value=self._pools_ready(),
        )
        yield CounterMetricFamily(
            "orchestratord_registrations", "Node registrations accepted", value=self.registrations
        )
        yield CounterMetricFamily(
            "orchestratord_heartbeat_writeback_passes",
            "Passes of the heartbeat write-back begun (about one a second; stalls while the database hangs)",
            value=self._heartbeat_writeback_passes(),
        )
        for name, help_text, counts in (
            ("orchestratord_heartbeats", "Heartbeats by outcome", self.heartbeats),
            ("orchestratord_placements", "Placement decisions by outcome", self.placements),
        ):
            family = CounterMetricFamily(name, help_text, labels=["outcome"])
            for outcome, count in counts.items():
                family.add_metric([outcome], count)
            yield family
        latency = HistogramMetricFamily(
            "orchestratord_request_duration_seconds",
            "Time to answer a request, by route template",
            labels=["method", "route"],
        )
        for (method, route), series in sorted(self._latency.items()):
            cumulative, running = [], 0
            for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), series.buckets, strict=True):
                running += count
                cumulative.append((_bound_text(bound), running))
            latency.add_metric([method, route], cumulative, sum_value=series.total_s)
        yield latency


def _bound_text(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
