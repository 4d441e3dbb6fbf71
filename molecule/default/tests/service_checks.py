"""Checks shared by the verify tests: a service's process and hardening, the registry, seen on the host."""

from __future__ import annotations

import ipaddress
import json
import socket
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
    # The super options of /proc as the process sees it (ProtectProc=, ProcSubset=).
    proc_mount = host.check_output("awk '$5 == \"/proc\" {print $NF}' /proc/%s/mountinfo", pid)
    dev_mount = host.check_output("awk '$5 == \"/dev\" {print $6}' /proc/%s/mountinfo", pid)
    limits = host.file(f"/proc/{pid}/limits").content_string
    open_files = next(line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files"))
    return {
        "pid": pid,
        "user": host.check_output("ps -o user= -p %s", pid).strip(),
        "no_new_privs": fields["NoNewPrivs"].strip(),
        "seccomp": fields["Seccomp"].strip(),
        "cap_effective": fields["CapEff"].strip(),
        "cap_bounding": fields["CapBnd"].strip(),
        "root_mount_options": root_mount,
        "proc_mount_options": proc_mount,
        "dev_mount_options": dev_mount,
        "open_files_soft_hard": open_files,
    }


def hard_open_files_limit(host: Any) -> int:
    """The most open files any service here can get: the container's hard limit, as PID 1 holds it."""
    limits = host.file("/proc/1/limits").content_string
    return int(next(line.split()[4] for line in limits.splitlines() if line.startswith("Max open files")))


def connect_from_unit_cgroup(host: Any, unit: str, address: str, port: int) -> str:
    """Try a TCP connection from a short-lived process moved into the unit's cgroup, where systemd's
    IPAddressAllow/Deny programs apply; returns "connected", "refused", "timeout" or the error."""
    pid = unit_properties(host, unit, "MainPID")["MainPID"]
    cgroup = host.check_output("sed -n 's/^0:://p' /proc/%s/cgroup", pid)
    probe = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(({address!r}, {port}), 3).close(); print('connected')\n"
        "except ConnectionRefusedError: print('refused')\n"
        "except (TimeoutError, socket.timeout): print('timeout')\n"
        "except OSError as error: print(error.strerror)\n"
    )
    # The cgroup's path is an argument, not part of the script: a template unit's slice is escaped
    # (system-llorch\x2dengine.slice), and a backslash inside the script would be taken by the shell.
    script = 'echo $$ > "$1" && exec python3 -c "$0"'
    procs = f"/sys/fs/cgroup/unified{cgroup}/cgroup.procs"
    return host.check_output("sh -c %s %s %s", script, probe, procs).strip()


def connect_from_host(host: Any, address: str, port: int) -> str:
    """The same connection from outside any service's cgroup, as a baseline."""
    probe = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(({address!r}, {port}), 3).close(); print('connected')\n"
        "except ConnectionRefusedError: print('refused')\n"
        "except (TimeoutError, socket.timeout): print('timeout')\n"
        "except OSError as error: print(error.strerror)\n"
    )
    return host.check_output("python3 -c %s", probe).strip()


# The cluster CA on every host (roles orchestratord and pool_managerd copy it there): HTTPS only.
CA_FILE = "/etc/llorch/tls/ca.crt"


def registry_get(host: Any, path: str, token_file: str, base_url: str = "https://127.0.0.1:9200") -> Any:
    """GET a registry route from `host` (by default the control host itself) over HTTPS, trusting the cluster
    CA only; the token is read there from its 0600 file, never argv."""
    script = (
        "import ssl, urllib.request;"
        f"token = open({token_file!r}).read().strip();"
        f"req = urllib.request.Request('{base_url}{path}',"
        " headers={'Authorization': 'Bearer ' + token});"
        f"context = ssl.create_default_context(cafile={CA_FILE!r});"
        "print(urllib.request.urlopen(req, timeout=5, context=context).read().decode())"
    )
    return json.loads(host.check_output("python3 -c %s", script))


# The scenario's network (llorch_networks in molecule.yml): the only one the units may talk to.
SCENARIO_NETWORK = ipaddress.ip_network("10.89.240.0/24")


def address_outside_the_scenario_network() -> str:
    """An address of the test machine that the containers route to but the units may not reach."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # a UDP connect sends nothing; it only picks the source address
        address = probe.getsockname()[0]
    assert ipaddress.ip_address(address) not in SCENARIO_NETWORK, address
    return address


def assert_hardening_in_effect(host: Any, unit: str, proc_subset_pid: bool) -> dict[str, Any]:
    """What the kernel enforces on the unit's running main process, read from /proc."""
    process = main_process(host, unit)
    assert process["no_new_privs"] == "1"
    assert process["seccomp"] == "2", "no seccomp filter (SystemCallFilter) on the process"
    assert int(process["cap_effective"], 16) == 0
    assert int(process["cap_bounding"], 16) == 0
    # ProtectSystem=strict: the service sees / read-only.
    assert process["root_mount_options"].startswith("ro")
    # ProtectProc=invisible: other users' processes are hidden; ProcSubset=pid: only process folders.
    proc_options = process["proc_mount_options"].split(",")
    assert "hidepid=invisible" in proc_options
    assert ("subset=pid" in proc_options) == proc_subset_pid
    # LimitNOFILE=65536, capped by the container's hard limit (the lab's podman runs with 2048).
    expected = min(65536, hard_open_files_limit(host))
    assert process["open_files_soft_hard"] == [str(expected), str(expected)]
    assert expected > 1024  # systemd's default soft limit: the setting took effect
    return process


def assert_ip_filtering_in_effect(host: Any, unit: str, allowed: tuple[str, int]) -> None:
    """IPAddressDeny=any + IPAddressAllow=the scenario network: a peer inside answers, others do not."""
    outside = address_outside_the_scenario_network()
    # Baseline: from the host itself the outside address answers (a closed port refuses at once).
    assert connect_from_host(host, outside, 9) in ("connected", "refused")
    assert connect_from_unit_cgroup(host, unit, outside, 9) in ("timeout", "Operation not permitted")
    assert connect_from_unit_cgroup(host, unit, *allowed) == "connected"
