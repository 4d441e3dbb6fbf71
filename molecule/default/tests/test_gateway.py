"""The control host's gateway after converge: a client key streams a chat completion from the GPU node's
engine through /v1; the cluster token does not open /v1 and a client key does not open /v2; the key files on
the control host are the daemon's alone and hold the keys the controller's stores made."""

import hashlib
import json
import os
import time
from pathlib import Path

import testinfra.utils.ansible_runner

testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(
    os.environ["MOLECULE_INVENTORY_FILE"]
).get_hosts("control")

MODEL = "llorch-lab/tiny"
CLIENT_KEYS = "/etc/llorch/client-keys"
TOKEN_FILE = "/etc/llorch/orchestratord.token"
ENGINE_KEYS_DIR = "/etc/llorch/engine-keys"
# The controller's key stores (molecule.yml): what the roles made once and copied to the hosts.
STATE = (
    Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
    / ".lab"
    / "molecule"
)

# Run on the control host as root: reads the credential there (the client keys file's first key, or the
# cluster token), never from argv; asks the gateway on loopback; prints status, Content-Type and the body.
# argv: path, "client" or "token", JSON body or "".
ASK_GATEWAY = """
import ssl, sys, urllib.error, urllib.request
path, credential, body = sys.argv[1:]
if credential == "client":
    key = open("/etc/llorch/client-keys").read().split()[1]
else:
    key = open("/etc/llorch/orchestratord.token").read().strip()
headers = {"Authorization": "Bearer " + key, "Content-Type": "application/json"}
request = urllib.request.Request("https://127.0.0.1:9200" + path, data=body.encode() or None, headers=headers)
try:
    context = ssl.create_default_context(cafile="/etc/llorch/tls/ca.crt")
    with urllib.request.urlopen(request, timeout=60, context=context) as answer:
        status, content_type, text = answer.status, answer.headers.get("Content-Type"), answer.read().decode()
except urllib.error.HTTPError as error:
    status, content_type, text = error.code, error.headers.get("Content-Type"), error.read().decode()
print(status); print(content_type); print(text)
"""


def ask_gateway(host, path, credential="client", body=None):
    out = host.check_output(
        "python3 -c %s %s %s %s", ASK_GATEWAY, path, credential, json.dumps(body) if body is not None else ""
    )
    status, content_type, text = out.split("\n", 2)
    return int(status), content_type, text


def digest(text: str) -> str:
    """Compared by digest: a failed assertion shows no key."""
    return hashlib.sha256(text.strip().encode()).hexdigest()


def test_a_client_key_streams_a_completion_from_the_nodes_engine(host):
    # The gateway routes from the heartbeats it holds: the engine's model is listed once its pool is ready.
    deadline = time.monotonic() + 30
    while True:
        status, _, text = ask_gateway(host, "/v1/models")
        served = [model["id"] for model in json.loads(text)["data"]] if status == 200 else []
        if MODEL in served or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert (status, served) == (200, [MODEL]), text

    body = {
        "model": MODEL,
        "stream": True,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "Say hello to molecule."}],
    }
    status, content_type, text = ask_gateway(host, "/v1/chat/completions", body=body)
    assert status == 200, text
    assert content_type.startswith("text/event-stream")
    events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks and all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    # The engine's own chunks, passed through: generated text, and a finish reason at the end.
    assert any(choice["delta"].get("content") for chunk in chunks for choice in chunk["choices"])
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_the_cluster_token_is_not_a_client_key(host):
    status, content_type, text = ask_gateway(host, "/v1/models", credential="token")
    assert status == 401
    assert content_type.startswith("application/json")
    error = json.loads(text)["error"]
    assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")


def test_a_client_key_does_not_open_the_registry(host):
    status, _, _ = ask_gateway(host, "/v2/nodes", credential="client")
    assert status == 401


def test_the_client_keys_file_is_the_daemons_alone_and_holds_the_controllers_keys(host):
    keys = host.file(CLIENT_KEYS)
    assert (keys.user, keys.group, keys.mode) == ("orchestratord", "orchestratord", 0o600)
    lines = [line.split(" ") for line in keys.content_string.splitlines()]
    assert [name for name, _ in lines] == ["default"]
    assert digest(lines[0][1]) == digest((STATE / "client-keys" / "default").read_text())


def test_the_engine_keys_folder_holds_the_nodes_key_for_the_daemon_only(host):
    folder = host.file(ENGINE_KEYS_DIR)
    assert folder.is_directory
    assert (folder.user, folder.group, folder.mode) == ("root", "orchestratord", 0o750)
    assert host.check_output("ls -A %s", ENGINE_KEYS_DIR).split() == ["molecule-gpu"]
    key = host.file(f"{ENGINE_KEYS_DIR}/molecule-gpu")
    assert (key.user, key.mode) == ("orchestratord", 0o600)
    assert digest(key.content_string) == digest((STATE / "engine-api-keys" / "molecule-gpu").read_text())
