"""Ids `.` and `..` name nothing a client can address (paths get normalised on the way), so the daemon
refuses them wherever an id comes in: the registration's node_id and pool_id, and the path."""

from __future__ import annotations

import pytest
from support import sample_registration

DOT_IDS = [".", ".."]


@pytest.mark.parametrize("node_id", DOT_IDS)
def test_registration_with_a_dot_node_id_is_400(daemon, node_id):
    answer = daemon.api("POST", "/v2/nodes/register", sample_registration(node_id))
    assert answer.status == 400, answer.text
    assert "$.node_id" in answer.body["message"]


@pytest.mark.parametrize("pool_id", DOT_IDS)
def test_registration_with_a_dot_pool_id_is_400(daemon, pool_id):
    body = sample_registration("gpu-1")
    body["pools"][0]["pool_id"] = pool_id
    answer = daemon.api("POST", "/v2/nodes/register", body)
    assert answer.status == 400, answer.text
    assert "$.pools[0].pool_id" in answer.body["message"]


@pytest.mark.parametrize("quoted", ["%2E", "%2E%2E"])
@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [
        ("GET", "", None),
        ("DELETE", "", None),
        ("POST", "/drain", {"drain": True}),
        ("POST", "/heartbeat", {}),
    ],
)
def test_dot_node_id_in_the_path_is_400(daemon, quoted, method, suffix, body):
    answer = daemon.api(method, f"/v2/nodes/{quoted}{suffix}", body)
    assert answer.status == 400, answer.text
    assert answer.body["code"] == "INVALID_PARAMS"
    assert "node_id" in answer.body["message"]
