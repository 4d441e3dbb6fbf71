"""Checks shared by the verify tests: a service's process and hardening, the registry, seen on the host."""

from __future__ import annotations

import json
from typing import Any


def unit_properties(host: Any, unit: str, *names: str) -> dict[str, str]:
    """`systemctl show` properties of a unit, in one round trip."""
    out = host.check_output("systemctl show %s -p %s", unit, ",".join(names))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def main_process(host: Any, unit: str) -> dict[str, str]:
    """The running main process of a unit: its user and the kernel's view of its restrictions."""
    pid = unit_properties(host, unit, "MainPID")["MainPID"]
    assert pid != "0", f"{unit} has no main process"
    status = host.file(f"/proc/{pid}/status").content_string
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    # The mount options of / as the process sees it (its own mount namespace).
    root_mount = host.check_output("awk '$5 == \"/\" {print $6}' /proc/%s/mountinfo", pid)
    return {
        "user": host.check_output("ps -o user= -p %s", pid).strip(),
        "no_new_privs": fields["NoNewPrivs"].strip(),
        "root_mount_options": root_mount,
    }


def registry_get(host: Any, path: str, token_file: str) -> Any:
    """GET a registry route on the control host; the token is read there from its 0600 file, never argv."""
    script = (
        "import urllib.request;"
        f"token = open({token_file!r}).read().strip();"
        f"req = urllib.request.Request('http://127.0.0.1:9200{path}',"
        " headers={'Authorization': 'Bearer ' + token});"
        "print(urllib.request.urlopen(req, timeout=5).read().decode())"
    )
    return json.loads(host.check_output("python3 -c %s", script))
