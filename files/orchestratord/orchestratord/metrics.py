"""Prometheus metrics on the daemon's own registry; labels are routes and outcomes, never node ids.

The event loop is the only writer, so the hot path keeps plain counters (no locks, one bisect per
request) and prometheus_client turns them into metric families when /metrics is scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .routing import RoutingTable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
HEARTBEAT_OUTCOMES = ("ok", "unknown_node", "invalid")
PLACEMENT_OUTCOMES = ("placed", "model_not_available", "no_capacity", "invalid")


# The gateway's times run from milliseconds (a queue wait) to minutes (a long answer).
GATEWAY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
NODE_LOST_PHASES = ("before_commit", "after_commit")
UNKNOWN_MODEL = "_unknown"  # the label of a model no engine is set up for: label counts stay bounded


class _Latency:
    __slots__ = ("bounds", "buckets", "total_s")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total_s = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(self.bounds, seconds)] += 1
        self.total_s += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        cumulative, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.buckets, strict=True):
            running += count
            cumulative.append((_bound_text(bound), running))
        return cumulative


class GatewayMetrics:
    """The gateway's plain counters, by model label (a served model's id or UNKNOWN_MODEL)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}  # (model, outcome) -> count
        self.first_byte: dict[str, _Latency] = {}
        self.duration: dict[str, _Latency] = {}
        self.queue_wait: dict[str, _Latency] = {}
        self.retries = 0
        self.resends = 0  # sent once more on a fresh connection: the engine had closed the pooled one
        # Engine requests cut off because their node went offline, by whether the answer had begun.
        self.node_lost = dict.fromkeys(NODE_LOST_PHASES, 0)

    def finished(self, model: str, outcome: str, seconds: float) -> None:
        key = (model, outcome)
        self.requests[key] = self.requests.get(key, 0) + 1
        _series(self.duration, model).observe(seconds)

    def committed(self, model: str, seconds: float) -> None:
        _series(self.first_byte, model).observe(seconds)

    def waited(self, model: str, seconds: float) -> None:
        _series(self.queue_wait, model).observe(seconds)


def _series(by_model: dict[str, _Latency], model: str) -> _Latency:
    series = by_model.get(model)
    if series is None:
        series = by_model[model] = _Latency(GATEWAY_BUCKETS_S)
    return series


class Metrics(Collector):
    def __init__(
        self,
        count_by_status: Callable[[], dict[str, int]],
        pools_ready: Callable[[], int],
        heartbeat_writeback_passes: Callable[[], int],
        routes: RoutingTable | None = None,
        certificate_expiry: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self._count_by_status = count_by_status
        self._certificate_expiry = certificate_expiry  # tls.ServerTls.expiry; None on plain HTTP
        self._pools_ready = pools_ready
        self._heartbeat_writeback_passes = heartbeat_writeback_passes
        self.registrations = 0
        self.heartbeats = dict.fromkeys(HEARTBEAT_OUTCOMES, 0)
        self.placements = dict.fromkeys(PLACEMENT_OUTCOMES, 0)
        self._latency: dict[tuple[str, str], _Latency] = {}
        self.gateway = GatewayMetrics()
        self._routes = routes
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def observe_request(self, method: str, route: str, seconds: float) -> None:
        latency = self._latency.get((method, route))
        if latency is None:
            latency = self._latency[(method, route)] = _Latency()
        latency.observe(seconds)

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
            latency.add_metric([method, route], series.cumulative(), sum_value=series.total_s)
        yield latency
        yield from self._collect_gateway()
        if self._certificate_expiry is not None:
            expiry = GaugeMetricFamily(
                "orchestratord_tls_certificate_expiry_timestamp_seconds",
                "Not-after of the certificate served (server) and of the cluster CA (ca), as unix time",
                labels=["certificate"],
            )
            for certificate, seconds in sorted(self._certificate_expiry().items()):
                expiry.add_metric([certificate], seconds)
            yield expiry

    def _collect_gateway(self) -> Iterator:
        gateway = self.gateway
        requests = CounterMetricFamily(
            "orchestratord_gateway_requests",
            "Client requests by model and outcome",
            labels=["model", "outcome"],
        )
        for (model, outcome), count in sorted(gateway.requests.items()):
            requests.add_metric([model, outcome], count)
        yield requests
        for name, help_text, by_model in (
            (
                "orchestratord_gateway_first_byte_seconds",
                "Request received -> the engine's first real token passed on (queue wait included)",
                gateway.first_byte,
            ),
            ("orchestratord_gateway_duration_seconds", "Request received -> answer ended", gateway.duration),
            (
                "orchestratord_gateway_queue_wait_seconds",
                "Time spent in the admission queue",
                gateway.queue_wait,
            ),
        ):
            family = HistogramMetricFamily(name, help_text, labels=["model"])
            for model, series in sorted(by_model.items()):
                family.add_metric([model], series.cumulative(), sum_value=series.total_s)
            yield family
        yield CounterMetricFamily(
            "orchestratord_gateway_retries",
            "Requests tried again on another pool before the first token",
            value=gateway.retries,
        )
        yield CounterMetricFamily(
            "orchestratord_gateway_engine_resends",
            "Requests sent once more to the same engine on a fresh connection (it had closed the pooled one)",
            value=gateway.resends,
        )
        node_lost = CounterMetricFamily(
            "orchestratord_gateway_node_lost",
            "Engine requests cut off because their node went offline: before the first token (tried on "
            "another pool) or after it (the answer ended broken)",
            labels=["phase"],
        )
        for phase, count in gateway.node_lost.items():
            node_lost.add_metric([phase], count)
        yield node_lost
        routes = self._routes
        yield CounterMetricFamily(
            "orchestratord_gateway_set_aside",
            "Pools set aside after repeated failures (until their node's next heartbeat)",
            value=0 if routes is None else routes.set_aside_total,
        )
        in_flight = GaugeMetricFamily(
            "orchestratord_gateway_in_flight", "Requests the gateway has on each pool now", labels=["pool"]
        )
        queue_length = GaugeMetricFamily(
            "orchestratord_gateway_queue_length", "Requests waiting for a slot, by model", labels=["model"]
        )
        if routes is not None:
            for key in sorted(set(routes.pools) | set(routes.in_flight)):
                in_flight.add_metric([f"{key[0]}/{key[1]}"], routes.in_flight.get(key, 0))
            for model in sorted(set(routes.by_model) | set(routes.queues)):
                queue_length.add_metric([model], routes.queue_length(model))
        yield in_flight
        yield queue_length


def _bound_text(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
