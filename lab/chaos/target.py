"""Where the running podman lab is and how to reach it: the ONE place lab/chaos reads it from.

Everything comes from what `make lab` wrote: the generated inventory (inventories/lab/hosts.yml: the
prefix, the addresses, the controller URL) and the lab's state folder (.lab/<prefix>/: the API token and the
client key `default`, both 0600, read here and never printed). When the lab switches to HTTPS the inventory's
URL says https:// and `CA_FILE` below is the one line to point at the lab's CA.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
INVENTORY = REPO_ROOT / "inventories" / "lab" / "hosts.yml"
# The lab's CA certificate, relative to its state folder; used only for an https:// controller URL.
CA_FILE = "pki/ca.crt"


class LabError(Exception):
    """The lab is not up, or not as `make lab` leaves it: one line saying what to do."""


@dataclass(frozen=True)
class Answer:
    status: int | None  # None: no HTTP answer
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Lab:
    prefix: str
    state_dir: Path
    control_url: str
    ca_file: str | None
    hosts: dict[str, str]  # container (= inventory host = node id) -> address
    control: str
    gpu_nodes: tuple[str, ...]
    api_token: str = field(repr=False)
    client_key: str = field(repr=False)

    @property
    def network(self) -> str:
        return f"{self.prefix}-lab"

    def ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=self.ca_file) if self.ca_file else None

    def api(self, method: str, path: str, body: Any = None, timeout: float = 10) -> Answer:
        """One request to orchestratord with the lab's API token; never raises."""
        request = urllib.request.Request(
            self.control_url + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Bearer {self.api_token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=self.ssl_context()) as answer:
                status, raw, headers = answer.status, answer.read(), dict(answer.headers)
        except urllib.error.HTTPError as error:
            status, raw, headers = error.code, error.read(), dict(error.headers)
        except (OSError, ValueError):
            return Answer(None, None)
        try:
            return Answer(status, json.loads(raw) if raw else None, headers)
        except ValueError:
            return Answer(status, raw.decode(errors="replace"), headers)

    def node(self, node_id: str) -> dict | None:
        answer = self.api("GET", f"/v2/nodes/{node_id}", timeout=5)
        return answer.body if answer.status == 200 else None

    def model(self) -> str:
        """The model the lab's engines serve (the lab inventory's first pool with an engine)."""
        pools = yaml.safe_load((REPO_ROOT / "inventories/lab/group_vars/gpu_nodes/main.yml").read_text())
        return next(p["engine"]["model"] for p in pools["pool_managerd_pools"] if "engine" in p)

    def run_in(self, container: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """A command inside a lab container (as root, through podman: no ssh in the way of a fault)."""
        return subprocess.run(
            ["podman", "exec", container, *argv], capture_output=True, text=True, timeout=timeout
        )

    def unit_show(self, container: str, unit: str) -> dict[str, str]:
        """`systemctl show` of a unit: MainPID, NRestarts, ActiveState, ActiveEnterTimestamp."""
        shown = self.run_in(
            container, "systemctl", "show", unit, "-p", "MainPID,NRestarts,ActiveState,ActiveEnterTimestamp"
        )
        return dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)


def _secret(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as error:
        raise LabError(
            f"cannot read {path.relative_to(REPO_ROOT)} ({error.strerror}): run `make lab` first"
        ) from None


def lab() -> Lab:
    """The lab `make lab` last brought up from this checkout."""
    if not INVENTORY.exists():
        raise LabError(f"no {INVENTORY.relative_to(REPO_ROOT)}: bring the lab up with `make lab` first")
    inventory = yaml.safe_load(INVENTORY.read_text())["all"]
    variables, groups = inventory["vars"], inventory["children"]
    state_dir = Path(variables["lab_state_dir"])
    control_url = variables["llorch_controller_url"]
    hosts = {
        name: host["ansible_host"]
        for group in groups.values()
        for name, host in (group.get("hosts") or {}).items()
    }
    return Lab(
        prefix=variables["lab_prefix"],
        state_dir=state_dir,
        control_url=control_url,
        ca_file=str(state_dir / CA_FILE) if control_url.startswith("https://") else None,
        hosts=hosts,
        control=next(iter(groups["control"]["hosts"])),
        gpu_nodes=tuple(groups["gpu_nodes"]["hosts"]),
        api_token=_secret(state_dir / "api-token"),
        client_key=_secret(state_dir / "client-keys" / "default"),
    )
