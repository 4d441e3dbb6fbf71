#!/usr/bin/python
# Copyright: llorch-kit contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: read the NVIDIA driver and GPUs of a host through nvidia-smi."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: nvidia_gpu_facts
short_description: Read the NVIDIA driver, CUDA version and GPUs of a host
description:
  - Runs C(nvidia-smi) (the path is an option) through the kit's one parser, C(module_utils/nvidia_smi.py),
    and returns the driver version, the CUDA version and every GPU with its name, uuid, VRAM in bytes,
    compute capability, MIG mode, persistence mode and uncorrected ECC error count.
  - Also reads the version of the NVIDIA kernel module that is loaded for the running kernel, from
    C(/proc/driver/nvidia/version), so a caller can tell a driver upgrade that still waits for a reboot.
  - It only reads; it never changes the host and always reports C(changed=false).
  - With O(fail_on_error=false) a failing C(nvidia-smi) is returned as RV(ansible_facts.nvidia_gpu.error)
    instead of failing the task, so a caller can explain the failure (M(ansible.builtin.assert) in the
    C(gpu_preflight) role does).
version_added: "0.1.0"
author: llorch-kit contributors (@llorch-kit)
options:
  nvidia_smi:
    description: Path or name (looked up in C(PATH)) of C(nvidia-smi).
    type: str
    default: nvidia-smi
  timeout:
    description: Seconds one C(nvidia-smi) call may take; a hung driver is reported as a timeout.
    type: float
    default: 15
  driver_version_file:
    description:
      - The kernel module's version file. Absent when the module is not loaded.
    type: path
    default: /proc/driver/nvidia/version
  fail_on_error:
    description:
      - Fail the task when C(nvidia-smi) fails or prints something unreadable.
      - When false the failure is returned in RV(ansible_facts.nvidia_gpu.error).
    type: bool
    default: true
attributes:
  check_mode:
    support: full
    description: The module only reads; it runs the same in check mode.
  diff_mode:
    support: none
    description: Nothing to compare; the module changes nothing.
  facts:
    support: full
    description: Sets RV(ansible_facts.nvidia_gpu).
notes:
  - The tests and the lab point O(nvidia_smi) at C(nvidia-smi-standin), a stand-in that replays recorded
    output; it is never installed on a real GPU host.
"""

EXAMPLES = r"""
- name: Read the GPUs
  nvidia_gpu_facts:

- name: Read the GPUs with a non-standard nvidia-smi, keeping failures as facts
  nvidia_gpu_facts:
    nvidia_smi: /usr/local/bin/nvidia-smi-standin
    fail_on_error: false

- name: Show the driver and the GPU count
  ansible.builtin.debug:
    msg: "driver {{ ansible_facts.nvidia_gpu.driver_version }}, {{ ansible_facts.nvidia_gpu.gpu_count }} GPUs"
"""

RETURN = r"""
ansible_facts:
  description: Facts about the NVIDIA driver and GPUs.
  returned: always
  type: dict
  contains:
    nvidia_gpu:
      description: The driver and GPUs as nvidia-smi reports them.
      returned: always
      type: dict
      contains:
        ok:
          description: Whether nvidia-smi answered and its output was read.
          type: bool
          sample: true
        error:
          description: Why nvidia-smi failed (null when O(fail_on_error=false) and it did not).
          type: dict
          sample: {"kind": "driver-mismatch", "message": "nvidia-smi: ... Driver/library version mismatch"}
          contains:
            kind:
              description: >-
                One of C(not-found), C(not-executable), C(timeout), C(no-devices), C(driver-mismatch),
                C(no-driver), C(nvml), C(gpu-lost), C(unsupported-field), C(garbled), C(failed).
              type: str
            message:
              description: What failed and what nvidia-smi printed.
              type: str
        driver_version:
          description: Version of the user-space driver (nvidia-smi's C(driver_version)).
          type: str
          sample: "550.90.07"
        cuda_version:
          description: Highest CUDA version the driver supports, null when nvidia-smi did not say.
          type: str
          sample: "12.4"
        gpu_count:
          description: Number of GPUs.
          type: int
          sample: 2
        gpus:
          description: One entry per GPU.
          type: list
          elements: dict
          sample:
            - index: 0
              uuid: GPU-5f2e0c9a-6b2b-4f43-9d2c-3a0b3a9c7e11
              name: NVIDIA L4
              vram_total_bytes: 24152899584
              vram_free_bytes: 23580639232
              compute_capability: "8.9"
              mig_mode: null
              persistence_mode: Enabled
              ecc_uncorrected: 0
              mig_devices: []
        kernel_module_loaded:
          description: Whether O(driver_version_file) exists (the kernel module is loaded).
          type: bool
          sample: true
        kernel_module_version:
          description: Version of the loaded kernel module, null when not loaded or unreadable.
          type: str
          sample: "550.90.07"
"""

# Ansible modules keep their imports below the documentation strings.
import re  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.llorch.kit.plugins.module_utils.nvidia_smi import NvidiaSmiError, probe  # noqa: E402

_KERNEL_MODULE_VERSION = re.compile(r"Kernel Module\s+(?:for\s+\S+\s+)?([0-9]+(?:\.[0-9]+)+)")


def read_kernel_module(path):
    """(loaded, version) from the kernel module's version file; the file exists only when it is loaded."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except FileNotFoundError:
        return False, None
    except OSError:
        return True, None
    match = _KERNEL_MODULE_VERSION.search(text)
    return True, match.group(1) if match else None


def main():
    module = AnsibleModule(
        argument_spec={
            "nvidia_smi": {"type": "str", "default": "nvidia-smi"},
            "timeout": {"type": "float", "default": 15.0},
            "driver_version_file": {"type": "path", "default": "/proc/driver/nvidia/version"},
            "fail_on_error": {"type": "bool", "default": True},
        },
        supports_check_mode=True,
    )
    loaded, module_version = read_kernel_module(module.params["driver_version_file"])
    facts = {
        "ok": True,
        "error": None,
        "driver_version": None,
        "cuda_version": None,
        "gpu_count": 0,
        "gpus": [],
        "kernel_module_loaded": loaded,
        "kernel_module_version": module_version,
    }
    try:
        result = probe(module.params["nvidia_smi"], timeout=module.params["timeout"])
    except NvidiaSmiError as error:
        facts.update(ok=False, error={"kind": error.kind, "message": str(error)})
        if module.params["fail_on_error"]:
            module.fail_json(msg=str(error), ansible_facts={"nvidia_gpu": facts})
    else:
        probed = result.as_dict()
        facts.update(
            driver_version=probed["driver_version"],
            cuda_version=probed["cuda_version"],
            gpus=probed["gpus"],
            gpu_count=len(probed["gpus"]),
        )
    module.exit_json(changed=False, ansible_facts={"nvidia_gpu": facts})


if __name__ == "__main__":
    main()
