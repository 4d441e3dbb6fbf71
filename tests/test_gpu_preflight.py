"""The gpu_preflight role on this machine, with the stand-in nvidia-smi replaying recorded machines."""

from __future__ import annotations

from support_nvsmi import unified_memory_machine
from support_roles import STANDIN, failures, local_host, run_playbook

PLAY = [{"name": "Preflight", "hosts": "gpu_nodes", "gather_facts": False, "roles": ["gpu_preflight"]}]


def preflight(tmp_path, fixture: str, **role_vars):
    host = local_host(gpu_preflight_nvidia_smi=str(STANDIN), **role_vars)
    inventory = {"all": {"children": {"gpu_nodes": {"hosts": {"gpu-test": host}}}}}
    return run_playbook(tmp_path, PLAY, inventory, env={"NVIDIA_SMI_STANDIN_FIXTURE": fixture})


def test_lab_machine_passes(tmp_path):
    rc, output = preflight(tmp_path, "lab-2x-l4", gpu_preflight_expected_gpu_count=2)
    assert rc == 0, failures(output)
    assert output["stats"]["gpu-test"]["changed"] == 0


def test_old_driver_fails_saying_found_required_and_fix(tmp_path):
    rc, output = preflight(tmp_path, "old-driver")
    message = failures(output)["gpu-test"]
    assert rc != 0
    assert "Found NVIDIA driver 470.182.03" in message
    assert "required >= 535.0" in message
    assert "Fix:" in message


def test_wrong_gpu_count_names_the_variable(tmp_path):
    _, output = preflight(tmp_path, "lab-2x-l4", gpu_preflight_expected_gpu_count=8)
    message = failures(output)["gpu-test"]
    assert "Found 2 GPU(s)" in message and "required 8" in message
    assert "gpu_preflight_expected_gpu_count" in message


def test_vram_and_persistence_mode_are_checked_per_gpu(tmp_path):
    _, output = preflight(
        tmp_path,
        "old-driver",
        gpu_preflight_min_driver_version="470.0",
        gpu_preflight_min_cuda_version="11.0",
        gpu_preflight_expected_persistence_mode="Enabled",
    )
    message = failures(output)["gpu-test"]
    assert "GPU 0 (Tesla T4" in message
    assert "persistence mode Disabled (required Enabled)" in message
    assert "-pm 1" in message


def test_driver_library_mismatch_says_reboot(tmp_path):
    _, output = preflight(tmp_path, "driver-mismatch")
    message = failures(output)["gpu-test"]
    assert "driver-mismatch" in message
    assert "reboot the node" in message


def test_kernel_module_of_another_version_is_named(tmp_path):
    version_file = tmp_path / "nvidia-version"
    version_file.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 2023\n")
    _, output = preflight(tmp_path, "lab-2x-l4", gpu_preflight_driver_version_file=str(version_file))
    message = failures(output)["gpu-test"]
    assert "Found kernel module 535.104.05" in message and "driver 550.90.07" in message


def test_unknown_vram_passes_without_a_minimum_and_fails_naming_it_with_one(tmp_path):
    machine = unified_memory_machine(tmp_path)
    (tmp_path / "any").mkdir()
    (tmp_path / "min").mkdir()
    rc, output = preflight(tmp_path / "any", machine)
    assert rc == 0, failures(output)

    rc, output = preflight(tmp_path / "min", machine, gpu_preflight_min_vram_bytes=2**30)
    message = failures(output)["gpu-test"]
    assert rc != 0
    assert "found VRAM unknown (nvidia-smi prints none" in message and "required >= 1073741824" in message
