"""Prometheus metrics on the daemon's own registry; labels are routes and outcomes, never node ids."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _ClusterCollector(Collector):
    """Node and pool gauges computed at scrape time, so they follow the same liveness rule as the API."""

    def __init__(self, count_by_status: Callable[[], dict[str, int]], pools_ready: Callable[[], int]) -> None:
        self._count_by_status = count_by_status
        self._pools_ready = pools_ready

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nodes = GaugeMetricFamily("orchestratord_nodes", "Registered nodes by status", labels=["status"])
        for status, count in self._count_by_status().items():
            nodes.add_metric([status], count)
        yield nodes
        yield GaugeMetricFamily(
            "orchestratord_pools_ready",
            "Pools on online nodes that can take work now",
            value=self._pools_ready(),
        )


class Metrics:
    def __init__(self, count_by_status: Callable[[], dict[str, int]], pools_ready: Callable[[], int]) -> None:
        # The *_created series double the output and nobody graphs them.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_ClusterCollector(count_by_status, pools_ready))
        self.registrations = Counter(
            "orchestratord_registrations", "Node registrations accepted", registry=self.registry
        )
        self.heartbeats = Counter(
            "orchestratord_heartbeats", "Heartbeats by outcome", ["outcome"], registry=self.registry
        )
        self.placements = Counter(
            "orchestratord_placements", "Placement decisions by outcome", ["outcome"], registry=self.registry
        )
        self.request_seconds = Histogram(
            "orchestratord_request_duration_seconds",
            "Time to answer a request, by route template",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self._request_children: dict[tuple[str, str], Histogram] = {}

    def observe_request(self, method: str, route: str, seconds: float) -> None:
        child = self._request_children.get((method, route))
        if child is None:
            child = self._request_children[(method, route)] = self.request_seconds.labels(method, route)
        child.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
