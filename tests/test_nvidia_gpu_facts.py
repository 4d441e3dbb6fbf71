"""nvidia_gpu_facts through its real entry point, `ansible localhost -m nvidia_gpu_facts`, on the stand-in.

The stand-in nvidia-smi (files/testing/) replays recorded machines; it is the only fake here.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from support import REPO_ROOT, first_task_result, on_localhost
from support_nvsmi import unified_memory_machine

STANDIN = REPO_ROOT / "files" / "testing" / "nvidia-smi-standin"


def gpu_facts(fixture: str, *args: str, tmp_path: Path, check: bool = False) -> tuple[int, dict]:
    """Run the module on localhost with the stand-in replaying `fixture`; return (rc, the host's result)."""
    env = dict(os.environ)
    env.update(
        ANSIBLE_CONFIG=str(REPO_ROOT / "ansible.cfg"),
        ANSIBLE_STDOUT_CALLBACK="json",
        ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
        ANSIBLE_LOCALHOST_WARNING="0",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="0",
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"),
        NVIDIA_SMI_STANDIN_FIXTURE=fixture,
    )
    module_args = " ".join([f"nvidia_smi={STANDIN}", *args])
    mode = ["--check"] if check else []
    proc = subprocess.run(
        on_localhost("ansible", "localhost", "-m", "llorch.kit.nvidia_gpu_facts", "-a", module_args, *mode),
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout, proc.stderr
    output = json.loads(proc.stdout)
    return proc.returncode, first_task_result(output)


def test_lab_machine_reports_two_l4_gpus_with_driver_and_cuda(tmp_path):
    rc, result = gpu_facts("lab-2x-l4", tmp_path=tmp_path)
    facts = result["ansible_facts"]["nvidia_gpu"]
    assert rc == 0 and result["changed"] is False
    assert facts["ok"] is True and facts["error"] is None
    assert facts["driver_version"] == "550.90.07"
    assert facts["cuda_version"] == "12.4"
    assert facts["gpu_count"] == 2
    assert [gpu["name"] for gpu in facts["gpus"]] == ["NVIDIA L4", "NVIDIA L4"]
    assert all(gpu["vram_total_bytes"] == 23034 * 1024 * 1024 for gpu in facts["gpus"])
    assert facts["gpus"][0]["compute_capability"] == "8.9"


def test_old_driver_is_read_without_the_field_it_rejects(tmp_path):
    rc, result = gpu_facts("old-driver", tmp_path=tmp_path)
    facts = result["ansible_facts"]["nvidia_gpu"]
    assert rc == 0
    assert facts["driver_version"] == "470.182.03"
    assert facts["cuda_version"] == "11.4"
    assert facts["gpus"][0]["compute_capability"] is None


def test_unified_memory_gpu_is_reported_with_its_vram_unknown_not_as_a_failure(tmp_path):
    machine = unified_memory_machine(tmp_path)
    rc, result = gpu_facts(machine, tmp_path=tmp_path)
    facts = result["ansible_facts"]["nvidia_gpu"]
    assert rc == 0 and facts["ok"] is True and facts["error"] is None
    assert (facts["driver_version"], facts["cuda_version"], facts["gpu_count"]) == ("580.95.05", "13.0", 1)
    (gpu,) = facts["gpus"]
    assert (gpu["index"], gpu["name"], gpu["compute_capability"]) == (0, "NVIDIA GB10", "12.1")
    assert (gpu["vram_total_bytes"], gpu["vram_free_bytes"]) == (None, None)


def test_driver_mismatch_fails_with_a_message_that_says_reboot(tmp_path):
    rc, result = gpu_facts("driver-mismatch", tmp_path=tmp_path)
    assert rc != 0 and result["failed"] is True
    assert "Driver/library version mismatch" in result["msg"]
    assert "reboot" in result["msg"]
    assert result["ansible_facts"]["nvidia_gpu"]["error"]["kind"] == "driver-mismatch"


@pytest.mark.parametrize(
    ("fixture", "kind"),
    [("no-devices", "no-devices"), ("no-communicate", "no-driver"), ("cut-off", "garbled")],
)
def test_failures_become_facts_when_asked_not_to_fail(fixture, kind, tmp_path):
    rc, result = gpu_facts(fixture, "fail_on_error=false", tmp_path=tmp_path)
    facts = result["ansible_facts"]["nvidia_gpu"]
    assert rc == 0 and result["changed"] is False
    assert facts["ok"] is False
    assert facts["error"]["kind"] == kind
    assert facts["gpus"] == [] and facts["gpu_count"] == 0


def test_missing_nvidia_smi_is_reported_as_not_found(tmp_path):
    _, result = gpu_facts(
        "lab-2x-l4", f"nvidia_smi={tmp_path / 'no-such-nvidia-smi'}", "fail_on_error=false", tmp_path=tmp_path
    )
    assert result["ansible_facts"]["nvidia_gpu"]["error"]["kind"] == "not-found"


def test_loaded_kernel_module_version_is_read_from_its_proc_file(tmp_path):
    version_file = tmp_path / "version"
    version_file.write_text(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.90.07  Fri May 31 09:35:42 UTC 2024\n"
        "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
    )
    _, result = gpu_facts("lab-2x-l4", f"driver_version_file={version_file}", tmp_path=tmp_path)
    facts = result["ansible_facts"]["nvidia_gpu"]
    assert facts["kernel_module_loaded"] is True
    assert facts["kernel_module_version"] == "550.90.07"


def test_check_mode_reads_the_same_facts(tmp_path):
    rc, result = gpu_facts("lab-2x-l4", tmp_path=tmp_path, check=True)
    assert rc == 0 and result["changed"] is False
    assert result["ansible_facts"]["nvidia_gpu"]["gpu_count"] == 2
