"""model_stage and redirects: the module follows them itself, and the user's credentials (headers, URL
userinfo) go only to the origin they were given for. Two real servers on two loopback addresses stand for a
model hub and the CDN it redirects to."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from support_staging import FileServer, deterministic_bytes, run_module
from support_tls import write_self_signed_certificate

MODEL_BYTES = deterministic_bytes(5 * 1024 * 1024 + 77, seed=3)
MODEL_SHA256 = hashlib.sha256(MODEL_BYTES).hexdigest()
HUB_TOKEN = "hub-token-" + "r" * 30
SIGNATURE = "cdn-signature-" + "q" * 20  # what a signed CDN URL carries in its query string


def start_server(tmp_path: Path, name: str, host: str, tls: bool = False) -> FileServer:
    root = tmp_path / name
    root.mkdir()
    (root / "tiny.gguf").write_bytes(MODEL_BYTES)
    certificate = None
    if tls:
        certificate = (tmp_path / f"{name}-cert.pem", tmp_path / f"{name}-key.pem")
        write_self_signed_certificate(*certificate)
    return FileServer(root, host=host, tls=certificate).start()


@pytest.fixture
def hub(tmp_path):
    server = start_server(tmp_path, "hub", "127.0.0.1")
    yield server
    server.stop()


@pytest.fixture
def cdn(tmp_path):
    server = start_server(tmp_path, "cdn", "127.0.0.2")  # another origin: other address, other port
    yield server
    server.stop()


def stage_args(source: str, models_dir: Path, **overrides) -> dict:
    args = {
        "id": "tiny",
        "source": source,
        "dest": "tiny.gguf",
        "sha256": MODEL_SHA256,
        "size_bytes": len(MODEL_BYTES),
        "models_dir": str(models_dir),
    }
    args.update(overrides)
    return args


SECRET_HEADERS = {
    "Authorization": f"Bearer {HUB_TOKEN}",
    "Cookie": "hub_session=cookie-secret",
    "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
    "X-Api-Key": "api-key-secret",
}


def test_a_redirect_to_another_origin_carries_no_credentials_and_the_download_succeeds(hub, cdn, models_dir):
    hub.rules.token = HUB_TOKEN
    hub.rules.redirects["/org/repo/resolve/main/tiny.gguf"] = f"{cdn.url}/tiny.gguf?X-Signature={SIGNATURE}"
    source = hub.url.replace("http://", "http://hub-user:url-secret@") + "/org/repo/resolve/main/tiny.gguf"

    result, proc = run_module(stage_args(source, models_dir, headers=SECRET_HEADERS))

    assert result["changed"] is True, result
    assert (models_dir / "tiny.gguf").read_bytes() == MODEL_BYTES
    assert [request.authorization for request in hub.requests] == [f"Bearer {HUB_TOKEN}"]
    assert [request.path for request in cdn.requests] == [f"/tiny.gguf?X-Signature={SIGNATURE}"]
    sent_to_cdn = {name.lower() for name in cdn.requests[0].headers}
    assert not sent_to_cdn & {"authorization", "cookie", "proxy-authorization", "x-api-key"}, sent_to_cdn
    output = proc.stdout + proc.stderr
    for secret in (HUB_TOKEN, "cookie-secret", "api-key-secret", "url-secret", SIGNATURE):
        assert secret not in output


def test_a_redirect_within_the_origin_keeps_the_headers(hub, models_dir):
    hub.rules.token = HUB_TOKEN
    hub.rules.redirects["/old/tiny.gguf"] = "../tiny.gguf"  # relative, resolved against the request's URL

    result, _ = run_module(
        stage_args(f"{hub.url}/old/tiny.gguf", models_dir, headers={"Authorization": f"Bearer {HUB_TOKEN}"})
    )

    assert result["changed"] is True, result
    assert [(request.path, request.authorization) for request in hub.requests] == [
        ("/old/tiny.gguf", f"Bearer {HUB_TOKEN}"),
        ("/tiny.gguf", f"Bearer {HUB_TOKEN}"),
    ]


def test_credentials_dropped_at_another_origin_stay_dropped_when_it_redirects_back(hub, cdn, models_dir):
    hub.rules.redirects["/tiny.gguf"] = f"{cdn.url}/bounce"
    cdn.rules.redirects["/bounce"] = f"{hub.url}/back/tiny.gguf"
    hub.rules.redirects["/back/tiny.gguf"] = "/final/tiny.gguf"
    (hub.root / "final").mkdir()
    (hub.root / "final" / "tiny.gguf").write_bytes(MODEL_BYTES)

    result, _ = run_module(
        stage_args(f"{hub.url}/tiny.gguf", models_dir, headers={"Authorization": f"Bearer {HUB_TOKEN}"})
    )

    assert result["changed"] is True, result
    assert [(request.path, request.authorization) for request in hub.requests] == [
        ("/tiny.gguf", f"Bearer {HUB_TOKEN}"),
        ("/back/tiny.gguf", None),
        ("/final/tiny.gguf", None),
    ]
    assert cdn.requests[0].authorization is None


def test_too_many_redirects_fail_naming_the_limit_without_credentials_or_query(hub, models_dir):
    for hop in range(12):
        hub.rules.redirects[f"/hop{hop}"] = f"/hop{hop + 1}?sig={SIGNATURE}"
    source = hub.url.replace("http://", "http://hub-user:url-secret@") + "/hop0?token=query-secret"

    result, proc = run_module(stage_args(source, models_dir))

    assert result.get("failed") is True, result
    assert "too many redirects" in result["msg"] and "10" in result["msg"], result["msg"]
    assert f"{hub.url}/hop0" in result["msg"]
    assert len(hub.requests) == 11  # the request and ten redirects followed, then it stops
    for secret in ("url-secret", "query-secret", SIGNATURE):
        assert secret not in result["msg"]
    assert "url-secret" not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (models_dir / "tiny.gguf").exists()


def test_a_redirect_from_https_to_http_is_refused(tmp_path, cdn, models_dir):
    secure_hub = start_server(tmp_path, "secure-hub", "127.0.0.1", tls=True)
    try:
        secure_hub.rules.redirects["/tiny.gguf"] = f"{cdn.url}/tiny.gguf?X-Signature={SIGNATURE}"

        result, proc = run_module(
            stage_args(
                f"{secure_hub.url}/tiny.gguf",
                models_dir,
                validate_certs=False,
                headers={"Authorization": f"Bearer {HUB_TOKEN}"},
            )
        )
    finally:
        secure_hub.stop()

    assert result.get("failed") is True, result
    assert "https" in result["msg"] and "http://" in result["msg"] and "refus" in result["msg"], result["msg"]
    assert f"{cdn.url}/tiny.gguf" in result["msg"]
    assert SIGNATURE not in proc.stdout + proc.stderr
    assert cdn.requests == []
    assert not (models_dir / "tiny.gguf").exists()


def test_a_download_dropped_after_a_redirect_resumes_through_the_redirect(hub, cdn, models_dir):
    hub.rules.token = HUB_TOKEN
    hub.rules.redirects["/tiny.gguf"] = f"{cdn.url}/tiny.gguf"
    cut = 3 * 1024 * 1024 + 5
    cdn.rules.drop_after["/tiny.gguf"] = cut
    args = stage_args(f"{hub.url}/tiny.gguf", models_dir, headers={"Authorization": f"Bearer {HUB_TOKEN}"})

    dropped, _ = run_module(args)
    assert dropped.get("failed") is True and "resume" in dropped["msg"], dropped
    assert (models_dir / "tiny.gguf.partial").stat().st_size == cut

    resumed, _ = run_module(args)

    assert resumed["changed"] is True, resumed
    assert resumed["resumed_from"] == cut
    assert resumed["bytes_downloaded"] == len(MODEL_BYTES) - cut
    assert [request.range for request in hub.requests] == [None, f"bytes={cut}-"]
    assert [request.range for request in cdn.requests] == [None, f"bytes={cut}-"]
    assert all(request.authorization is None for request in cdn.requests)
    assert (models_dir / "tiny.gguf").read_bytes() == MODEL_BYTES
