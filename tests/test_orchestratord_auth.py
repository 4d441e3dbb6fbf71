"""Auth: every /v2 route needs the bearer token; the probes and the document do not."""

from __future__ import annotations

import pytest
from support import TEST_TOKEN, make_daemon

V2_ROUTES = [
    ("GET", "/v2/nodes", None),
    ("GET", "/v2/nodes/gpu-1", None),
    ("DELETE", "/v2/nodes/gpu-1", None),
    ("POST", "/v2/nodes/register", {}),
    ("POST", "/v2/nodes/gpu-1/heartbeat", {}),
    ("POST", "/v2/nodes/gpu-1/drain", {"drain": True}),
    ("GET", "/v2/catalog/availability", None),
    ("GET", "/v2/catalog/models", None),
    ("POST", "/v2/placement", {}),
]

WRONG_TOKENS = {
    "missing": {},
    "wrong with the same length": {"token": "z" * len(TEST_TOKEN)},
    "wrong and shorter": {"token": "short"},
    "wrong and longer": {"token": TEST_TOKEN + "-and-more"},
    "the right token with another scheme": {
        "token": None,
        "headers": {"Authorization": f"Basic {TEST_TOKEN}"},
    },
    "bearer with nothing after it": {"token": None, "headers": {"Authorization": "Bearer "}},
}


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory):
    daemon = make_daemon(tmp_path_factory.mktemp("auth")).start()
    yield daemon
    daemon.stop()


@pytest.mark.parametrize("how", WRONG_TOKENS)
@pytest.mark.parametrize(("method", "path", "body"), V2_ROUTES)
def test_v2_route_without_the_right_token_is_401(shared_daemon, how, method, path, body):
    kwargs = {"token": None, **WRONG_TOKENS[how]}
    answer = shared_daemon.api(method, path, body, **kwargs)
    assert answer.status == 401
    assert answer.body == {"code": "UNAUTHORIZED", "message": "missing or wrong bearer token"}
    assert answer.headers.get("WWW-Authenticate") == "Bearer"


def test_right_token_is_accepted(shared_daemon):
    assert shared_daemon.api("GET", "/v2/nodes").status == 200
    # The scheme name is case-insensitive.
    lower = {"Authorization": f"bearer {TEST_TOKEN}"}
    assert shared_daemon.api("GET", "/v2/nodes", token=None, headers=lower).status == 200


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics", "/openapi.json"])
def test_probes_need_no_token(shared_daemon, path):
    assert shared_daemon.api("GET", path, token=None).status == 200


def test_health_says_ok_and_version(shared_daemon):
    body = shared_daemon.api("GET", "/health", token=None).body
    assert body["status"] == "ok"
    assert body["version"]


def test_token_never_logged(shared_daemon):
    shared_daemon.api("GET", "/v2/nodes", token="z" * len(TEST_TOKEN))
    assert TEST_TOKEN not in shared_daemon.log()


def test_the_token_check_compares_equal_length_digests_in_constant_time(monkeypatch):
    """Timing cannot be asserted on a shared machine; what makes it constant can: every offered token,
    whatever its length, reaches hmac.compare_digest as a 32-byte digest beside the token's digest."""
    from support import REPO_ROOT

    monkeypatch.syspath_prepend(str(REPO_ROOT / "files" / "orchestratord"))
    from orchestratord import auth

    compared: list[tuple[bytes, bytes]] = []
    real_compare = auth.hmac.compare_digest

    def recording_compare(a, b):
        compared.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", recording_compare)
    check = auth.BearerAuth(TEST_TOKEN)
    offered = ["short", "z" * len(TEST_TOKEN), TEST_TOKEN + "-and-more", TEST_TOKEN]
    answers = [check.allows(f"Bearer {token}") for token in offered]

    assert answers == [False, False, False, True]
    assert len(compared) == len(offered)
    assert all(len(a) == len(b) == 32 for a, b in compared)
    assert all(TEST_TOKEN.encode() not in (a, b) for a, b in compared)  # never the raw token
