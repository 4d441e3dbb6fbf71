"""Metrics: Prometheus text with nodes by status, pools ready, outcomes and latency; never a node id."""

from __future__ import annotations

import re

from support import sample_heartbeat, sample_registration
from support_daemon import online_node, place


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus text format."""
    label_text = ",".join(f'{key}="{value}"' for key, value in labels.items())
    pattern = "^" + re.escape(name) + (r"\{" + re.escape(label_text) + r"\}" if labels else "") + r" (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{name} {labels} not in metrics"
    return float(match.group(1))


def test_metrics_count_what_happened(daemon):
    online_node(daemon, "secret-node-name-1", ["llama"], serve="llama", pools=2)
    online_node(daemon, "secret-node-name-2", ["llama"], serve="llama")
    daemon.api("POST", "/v2/nodes/register", sample_registration("secret-node-name-3"))
    daemon.api("POST", "/v2/nodes/secret-node-name-2/drain", {"drain": True})
    daemon.api("POST", "/v2/nodes/nobody/heartbeat", sample_heartbeat(sample_registration("nobody")))
    place(daemon, model_id="llama")
    place(daemon, model_id="llama")
    place(daemon, model_id="mixtral")

    answer = daemon.api("GET", "/metrics", token=None)
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/plain")
    text = answer.text
    assert sample(text, "orchestratord_nodes", status="online") == 1
    assert sample(text, "orchestratord_nodes", status="draining") == 1
    assert sample(text, "orchestratord_nodes", status="registering") == 1
    assert sample(text, "orchestratord_nodes", status="offline") == 0
    assert sample(text, "orchestratord_pools_ready") == 2
    assert sample(text, "orchestratord_registrations_total") == 3
    assert sample(text, "orchestratord_heartbeats_total", outcome="ok") == 2
    assert sample(text, "orchestratord_heartbeats_total", outcome="unknown_node") == 1
    assert sample(text, "orchestratord_placements_total", outcome="placed") == 2
    assert sample(text, "orchestratord_placements_total", outcome="model_not_available") == 1
    assert (
        sample(
            text,
            "orchestratord_request_duration_seconds_count",
            method="POST",
            route="/v2/nodes/{node_id}/heartbeat",
        )
        == 3
    )
    # Node ids appear in one family only, the gateway's in-flight count per pool (issue 14's design).
    outside_in_flight = "\n".join(
        line for line in text.splitlines() if not line.startswith("orchestratord_gateway_in_flight{")
    )
    assert "secret-node-name" not in outside_in_flight
    assert "nobody" not in text


def test_metrics_can_be_turned_off(daemon_factory):
    daemon = daemon_factory(metrics_enabled=False)
    answer = daemon.api("GET", "/metrics", token=None)
    assert answer.status == 404
    assert answer.body["code"] == "NOT_FOUND"
    assert "/metrics" not in daemon.api("GET", "/openapi.json", token=None).body["paths"]
