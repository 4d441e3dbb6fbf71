"""The one nvidia-smi parser: every real recording read right, the stand-in's machines, clear failures."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import NamedTuple

import pytest
from support import REPO_ROOT
from support_agent import FIXTURES, MIB, STANDIN, standin_env
from support_nvsmi import real_recordings_dir

sys.path.insert(0, str(REPO_ROOT / "plugins" / "module_utils"))
# Imported from module_utils as a plain module (stdlib only), the way Ansible ships it to hosts.
import nvidia_smi
from nvidia_smi import NvidiaSmiError

REAL = real_recordings_dir()
NO_REAL = f"the real nvidia-smi recordings are not at {REAL} (set LLORCH_NVSMI_REAL to where they are)"


class Machine(NamedTuple):
    gpus: int
    name: str  # the first GPU's, as that output spells it (the table cuts long names)
    vram_mib: int | None  # the first GPU's total; None where the output does not carry it
    driver: str | None  # None where the output does not carry it (a CSV without driver_version)
    cuda: str | None  # None where that output does not carry it (--query-gpu CSV)
    mig: str | None  # the first GPU's current MIG mode
    indexed: bool = True  # False where the output does not say the GPUs' indices (a run with -i)


# What each real recording says, read off the files by hand. An error entry holds words the message must have.
EXPECTED: dict[str, Machine | tuple[str, ...]] = {
    "gpud--a10-drv535.129.03.q.txt": Machine(1, "NVIDIA A10", 23028, "535.129.03", "12.2", None),
    "gpud--geforce-fan-err-drv525.125.06.table.txt": Machine(
        1, "NVIDIA GeForce ...", 23028, "525.125.06", "12.0", None
    ),
    "gpud--h100x8-drv535.161.08.q.txt": Machine(
        8, "NVIDIA H100 80GB HBM3", 81559, "535.161.08", "12.2", "Disabled"
    ),
    # Cut off inside GPU 0's clock section (SOURCES.md; gpud keeps it as its invalid case).
    "gpud--h100x8-drv535.183.01-invalid.q.txt": (
        "-q output is cut off",
        "GPU 00000000:53:00.0 stops before its Processes entry",
        "describes 1 of 8 attached GPUs",
    ),
    "gpud--h100x8-drv535.183.01.q.txt": Machine(
        8, "NVIDIA H100 80GB HBM3", 81559, "535.183.01", "12.2", "Disabled"
    ),
    "gpud--h100x8-drv550.90.07.table.txt": Machine(
        8, "NVIDIA H100 80GB HBM3", 81559, "550.90.07", "12.4", "Disabled"
    ),
    "gpud--rtx-4090x8-drv535.154.05.q.txt": Machine(
        8, "NVIDIA GeForce RTX 4090", 24564, "535.154.05", "12.2", None
    ),
    "gpud--titan-v-drv560.35.03.q.txt": Machine(1, "NVIDIA TITAN V", 12288, "560.35.03", "12.6", None),
    "netdata--a100-sxm4-mig.xml": Machine(1, "NVIDIA A100-SXM4-40GB", 40960, "510.47.03", "11.6", "Enabled"),
    "netdata--help-query-gpu.txt": ("--help-query-gpu", "not a GPU recording"),
    "netdata--rtx-2080-win.xml": Machine(1, "NVIDIA GeForce RTX 2080", 8192, "516.59", "11.7", None),
    "netdata--rtx-3060.xml": Machine(
        1, "NVIDIA GeForce RTX 3060 Laptop GPU", 6144, "515.65.01", "11.7", None
    ),
    "netdata--rtx-4090-driver-535.xml": Machine(
        1, "NVIDIA GeForce RTX 4090", 24564, "535.86.05", "12.2", None
    ),
    # A query without index, memory.total and driver_version columns: read what is there.
    "netdata--tesla-p100.csv": Machine(1, "Tesla P100-PCIE-16GB", None, None, None, None, indexed=False),
    "netdata--tesla-p100.xml": Machine(1, "Tesla P100-PCIE-16GB", 16384, "510.47.03", "11.6", None),
    # 4 GPUs attached, one printed (a run with -i): which index it has, the file does not say.
    "telegraf--a100-sxm4-v12.xml": Machine(
        1, "NVIDIA A100-SXM4-80GB", 81920, "535.54.03", "12.2", "Enabled", indexed=False
    ),
    "telegraf--a10g.xml": Machine(1, "NVIDIA A10G", 23028, "515.105.01", "11.7", None),
    "telegraf--dual-rtx-2070-v13.xml": Machine(2, "NVIDIA GeForce RTX 2070", 8192, "590.44.01", "13.1", None),
    "telegraf--dual-rtx-2080-v13.xml": Machine(2, "NVIDIA GeForce RTX 2080", 8192, "590.44.01", "13.1", None),
    "telegraf--dual-rtx-a5000-v13.xml": Machine(2, "NVIDIA RTX A5000", 24564, "590.44.01", "13.1", None),
    "telegraf--gt-1030.xml": Machine(1, "NVIDIA GeForce GT 1030", 1998, "470.74", "11.4", None),
    # Edited down by its contributor (SOURCES.md): no log header at all, which nvidia-smi always writes.
    "telegraf--gtx-1070-ti.xml": ("no driver version in its log header", "trimmed"),
    "telegraf--gtx-1660-ti.xml": Machine(1, "Graphics Device", 5912, "418.43", "10.1", None),
    "telegraf--quadro-p2000-v12.xml": Machine(1, "Quadro P2000", 5120, "525.125.06", "12.0", None),
    "telegraf--quadro-p400.xml": Machine(1, "Quadro P400", 1998, "418.43", "10.1", None),
    "telegraf--rtx-3060-v12.xml": Machine(1, "NVIDIA GeForce RTX 3060", 12288, "570.124.04", "12.8", None),
    "telegraf--rtx-3080-v12.xml": Machine(1, "NVIDIA GeForce RTX 3080", 10240, "536.40", "12.2", None),
    "telegraf--rtx-3080-v13.xml": Machine(1, "NVIDIA GeForce RTX 3080", 10240, "595.58.03", "13.2", None),
    "telegraf--rtx-3090-v12.xml": Machine(1, "NVIDIA GeForce RTX 3090", 24576, "525.147.05", "12.0", None),
    "telegraf--rtx-3090-v13.xml": Machine(1, "NVIDIA GeForce RTX 3090", 24576, "590.44.01", "13.1", None),
    "telegraf--rtx-4000-sff-ada-v13.xml": Machine(
        1, "NVIDIA RTX 4000 SFF Ada Generation", 20475, "595.84", "13.2", None
    ),
    "telegraf--rtx-pro-6000-maxq-blackwell-v13.xml": Machine(
        1, "NVIDIA RTX PRO 6000 Blackwell Max-Q Workstation Edition", 97887, "590.44.01", "13.1", None
    ),
    "telegraf--tesla-p4.xml": Machine(1, "GRID P4-1Q", 1024, "513.46", "11.6", None),
    "telegraf--tesla-t4.xml": Machine(1, "Tesla T4", 15360, "515.105.01", "11.7", None),
}


def _nvgpuexp(machine: str, name: str, mib: int, driver: str, cuda: str, mig: str | None, short: str) -> None:
    """One nvidia_gpu_exporter capture and the four sections cut out of it."""
    prefix = f"nvgpuexp--{machine}--drv{driver}"
    EXPECTED[f"{prefix}.capture.txt"] = Machine(1, name, mib, driver, cuda, mig)
    EXPECTED[f"{prefix}.idle-q.txt"] = Machine(1, name, mib, driver, cuda, mig)
    EXPECTED[f"{prefix}.idle-table.txt"] = Machine(1, short, mib, driver, cuda, mig)
    EXPECTED[f"{prefix}.idle-query-gpu.csv"] = Machine(1, name, mib, driver, None, mig)
    EXPECTED[f"{prefix}.load-query-gpu.csv"] = Machine(1, name, mib, driver, None, mig)


H100, H200, RTX2080S = "NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA GeForce RTX 2080 SUPER"
_nvgpuexp("linux--h100-80gb-hbm3", H100, 81559, "590.48.01", "13.1", "Disabled", H100)
_nvgpuexp("linux--h100-mig", H100, 81559, "590.48.01", "13.1", "Enabled", H100)
_nvgpuexp("linux--h200", H200, 143771, "590.48.01", "13.1", "Disabled", H200)
_nvgpuexp("linux--h200-mig", H200, 143771, "590.48.01", "13.1", "Enabled", H200)
_nvgpuexp("linux--l40s", "NVIDIA L40S", 46068, "595.80", "13.2", None, "NVIDIA L40S")
_nvgpuexp("linux--rtx-2080-super", RTX2080S, 8192, "595.71.05", "13.2", None, "NVIDIA GeForce RTX 2080 ...")
# 610 renamed the header fields (KMD Version, CUDA UMD Version) and marks the old ones deprecated.
_nvgpuexp("linux--rtx-2080-super", RTX2080S, 8192, "610.57.04", "13.3", None, "NVIDIA GeForce RTX 2080 ...")
_nvgpuexp(
    "linux--rtx-4080-super",
    "NVIDIA GeForce RTX 4080 SUPER",
    16376,
    "595.71.05",
    "13.2",
    None,
    "NVIDIA GeForce RTX 4080 ...",
)
_nvgpuexp("windows--rtx-2080-super", RTX2080S, 8192, "591.86", "13.1", None, "NVIDIA GeForce RTX 2080 ...")
_nvgpuexp("windows--rtx-2080-super", RTX2080S, 8192, "610.62", "13.3", None, "NVIDIA GeForce RTX 2080 ...")


def _real_files() -> list[str]:
    if not REAL.is_dir():
        return ["(missing)"]
    return sorted(p.name for p in REAL.iterdir() if p.name not in ("README.md", "SOURCES.md"))


# Exact values the generic check above does not reach, per case the parser once refused or misread.
SPOT_CHECKS = {
    # MIG: the GPU's total and each MIG device, from the table, -q and XML.
    "nvgpuexp--linux--h100-mig--drv590.48.01.idle-table.txt": lambda gpu: (
        [
            (d["gpu_instance_id"], d["vram_total_bytes"] // MIB, d["vram_free_bytes"] // MIB)
            for d in gpu.mig_devices
        ]
        == [(2, 40448, 40422), (3, 20096, 20079), (9, 9984, 9975), (10, 9984, 9975)]
        and gpu.vram_free_bytes is None  # the table prints used, not free
    ),
    "nvgpuexp--linux--h100-mig--drv590.48.01.idle-q.txt": lambda gpu: (
        [(d["gpu_instance_id"], d["vram_total_bytes"] // MIB) for d in gpu.mig_devices]
        == [(2, 40448), (3, 20096), (9, 9984), (10, 9984)]
    ),
    "netdata--a100-sxm4-mig.xml": lambda gpu: (
        [
            (d["gpu_instance_id"], d["vram_total_bytes"] // MIB, d["vram_free_bytes"] // MIB)
            for d in gpu.mig_devices
        ]
        == [(1, 19968, 19948), (2, 19968, 19948)]
    ),
    # -i: an XML of one GPU out of 4, with its 4 MIG devices.
    "telegraf--a100-sxm4-v12.xml": lambda gpu: (
        gpu.uuid == "GPU-513536b6-7d19-9063-b049-1e69664bb298"
        and [d["vram_total_bytes"] // MIB for d in gpu.mig_devices] == [19968] * 4
    ),
    # A CSV without index, memory.total or driver_version: what is there is read, the rest is None.
    "netdata--tesla-p100.csv": lambda gpu: (
        (gpu.uuid, gpu.vram_free_bytes, gpu.vram_total_bytes, gpu.compute_capability)
        == ("GPU-ef1b2c9b-38d8-2090-2bd1-f567a3eb42a6", 16280 * MIB, None, None)
    ),
    # The fan cell says ERR!, the rest of the row is read.
    "gpud--geforce-fan-err-drv525.125.06.table.txt": lambda gpu: (
        (gpu.index, gpu.persistence_mode, gpu.ecc_uncorrected) == (0, "Disabled", 0)
    ),
}


@pytest.mark.parametrize("name", _real_files())
def test_every_real_recording_is_read_right_or_refused_clearly(name: str) -> None:
    if not REAL.is_dir():
        pytest.skip(NO_REAL)
    assert name in EXPECTED, f"{name} is new in {REAL}: add what it should read as to EXPECTED"
    expected = EXPECTED[name]
    text = (REAL / name).read_text(errors="replace")
    if not isinstance(expected, Machine):  # a refusal: the words its message must hold
        with pytest.raises(NvidiaSmiError) as caught:
            nvidia_smi.parse_recorded(text)
        for words in expected:
            assert words in str(caught.value)
        assert "\n" not in str(caught.value)
        return
    result = nvidia_smi.parse_recorded(text)
    first = result.gpus[0]
    vram_mib = None if first.vram_total_bytes is None else first.vram_total_bytes // MIB
    assert (len(result.gpus), first.name, vram_mib) == (expected.gpus, expected.name, expected.vram_mib)
    assert (result.driver_version, result.cuda_version, first.mig_mode) == (
        expected.driver,
        expected.cuda,
        expected.mig,
    )
    indices = list(range(expected.gpus)) if expected.indexed else [None] * expected.gpus
    assert [gpu.index for gpu in result.gpus] == indices
    for gpu in result.gpus:  # a value is a real amount or missing, never a made-up zero
        for amount in (gpu.vram_total_bytes, gpu.vram_free_bytes):
            assert amount is None or (amount > 0 and amount % MIB == 0)
    assert name not in SPOT_CHECKS or SPOT_CHECKS[name](first)
    assert result.as_dict()["gpus"][0]["name"] == expected.name


def test_mig_devices_are_listed_under_their_gpu() -> None:
    if not REAL.is_dir():
        pytest.skip(NO_REAL)
    text = (REAL / "nvgpuexp--linux--h200-mig--drv590.48.01.idle-q.txt").read_text()
    mig = nvidia_smi.parse_query_text(text).gpus[0].mig_devices
    assert [device["gpu_instance_id"] for device in mig] == [2, 2, 3, 9, 10]
    table = (REAL / "nvgpuexp--linux--h200-mig--drv590.48.01.idle-table.txt").read_text()
    from_table = nvidia_smi.parse_table(table).gpus[0].mig_devices
    assert [device["vram_total_bytes"] // MIB for device in from_table] == [71424, 71424, 33280, 16384, 16384]


# --- the probe, through the stand-in -------------------------------------------------------------------


def _probe(monkeypatch, fixture: str, timeout: float = 10.0, **env: str) -> nvidia_smi.ProbeResult:
    for name, value in {"NVIDIA_SMI_STANDIN_FIXTURE": str(FIXTURES / fixture), **env}.items():
        monkeypatch.setenv(name, value)
    return nvidia_smi.probe(str(STANDIN), timeout=timeout)


def test_probe_reads_the_lab_node(monkeypatch) -> None:
    result = _probe(monkeypatch, "lab-2x-l4")
    assert (result.driver_version, result.cuda_version) == ("550.90.07", "12.4")
    assert [(g.index, g.name, g.compute_capability) for g in result.gpus] == [
        (0, "NVIDIA L4", "8.9"),
        (1, "NVIDIA L4", "8.9"),
    ]
    assert all(g.vram_total_bytes == 23034 * MIB and g.vram_free_bytes == 22599 * MIB for g in result.gpus)
    assert result.gpus[0].uuid == "GPU-1ab0c7d2-5e3f-4a61-9b8d-0c2f7e4a9b10"
    assert (result.gpus[0].persistence_mode, result.gpus[0].ecc_uncorrected, result.gpus[0].mig_mode) == (
        "Enabled",
        0,
        None,
    )


def test_probe_reads_the_h100_recorded_on_a_real_gpu(monkeypatch) -> None:
    # h100-drv580 is what nvidia-smi printed on the one real GPU this kit was tried on (scripts/gpu-check.sh,
    # docs/engine.md); the live probe there read exactly this.
    result = _probe(monkeypatch, "h100-drv580")
    assert (result.driver_version, result.cuda_version) == ("580.159.04", "13.0")
    assert [(g.index, g.name, g.compute_capability, g.vram_total_bytes) for g in result.gpus] == [
        (0, "NVIDIA H100 80GB HBM3", "9.0", 85520809984)
    ]
    assert (result.gpus[0].persistence_mode, result.gpus[0].mig_mode, result.gpus[0].ecc_uncorrected) == (
        "Enabled",
        "Disabled",
        0,
    )
    from_xml = nvidia_smi.parse_recorded((FIXTURES / "h100-drv580" / "q.xml").read_text())
    assert [(g.name, g.vram_total_bytes, g.uuid) for g in from_xml.gpus] == [
        (g.name, g.vram_total_bytes, g.uuid) for g in result.gpus
    ]


def test_probe_drops_fields_an_old_driver_rejects(monkeypatch) -> None:
    result = _probe(monkeypatch, "old-driver")
    assert (result.driver_version, result.cuda_version) == ("470.182.03", "11.4")
    assert [(g.name, g.compute_capability, g.vram_total_bytes // MIB) for g in result.gpus] == [
        ("Tesla T4", None, 15109)
    ]


@pytest.mark.parametrize(
    ("fixture", "kind", "said"),
    [
        ("no-devices", "no-devices", "No devices were found"),
        ("driver-mismatch", "driver-mismatch", "Driver/library version mismatch"),
        ("no-communicate", "no-driver", "couldn't communicate with the NVIDIA driver"),
        ("cut-off", "garbled", "NVIDIA L4"),
    ],
)
def test_probe_failures_say_driver_or_gpu_and_quote_nvidia_smi(monkeypatch, fixture, kind, said) -> None:
    with pytest.raises(NvidiaSmiError) as caught:
        _probe(monkeypatch, fixture)
    message = str(caught.value)
    assert caught.value.kind == kind
    assert "driver" in message or "GPU" in message
    assert said in message
    assert "\n" not in message


def test_probe_without_nvidia_smi_says_no_driver() -> None:
    with pytest.raises(
        NvidiaSmiError, match="not found at '/nonexistent/nvidia-smi': the NVIDIA driver"
    ) as caught:
        nvidia_smi.probe("/nonexistent/nvidia-smi")
    assert caught.value.kind == "not-found"


def test_probe_gives_up_on_a_hung_nvidia_smi(monkeypatch) -> None:
    with pytest.raises(NvidiaSmiError, match=r"did not answer within 0.3 s: the GPU driver may be hung"):
        _probe(monkeypatch, "lab-2x-l4", timeout=0.3, NVIDIA_SMI_STANDIN_DELAY_S="5")


def test_a_hung_nvidia_smi_that_outlives_its_kill_is_given_up_on_in_bounded_time(monkeypatch) -> None:
    # nvidia-smi stuck inside the driver (a GPU fallen off the bus) does not die of SIGKILL until it leaves
    # the kernel, and no test can put a process there: so the kill is made to miss, and the hung stand-in
    # keeps running. The caller must still get its answer, not wait as long as the process lives.
    missed: list[subprocess.Popen] = []
    monkeypatch.setattr(subprocess.Popen, "kill", lambda self: missed.append(self))
    monkeypatch.setenv("NVIDIA_SMI_STANDIN_FIXTURE", str(FIXTURES / "hung"))
    raised: list[BaseException] = []

    def call() -> None:
        try:
            nvidia_smi.run_nvidia_smi(["--query-gpu=index", "--format=csv"], str(STANDIN), timeout=0.3)
        except BaseException as error:  # handed to the test's thread
            raised.append(error)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    try:
        caller.join(timeout=6)
        assert not caller.is_alive(), "run_nvidia_smi still waits for an nvidia-smi its kill could not end"
    finally:
        for proc in missed:  # the real kill, so nothing outlives the test
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        caller.join(timeout=10)
    assert missed, "the hung nvidia-smi was never killed"
    (error,) = raised
    assert isinstance(error, NvidiaSmiError) and error.kind == "timeout", error
    assert "did not answer within 0.3 s" in str(error)


# --- recorded text of every shape ------------------------------------------------------------------------


def test_csv_with_header_and_units_and_without_either_read_the_same() -> None:
    with_header = (
        "index, name, memory.total [MiB], memory.free [MiB], driver_version\n"
        "0, NVIDIA L4, 23034 MiB, 1 MiB, 550.90.07\n"
    )
    bare = "0, NVIDIA L4, 23034, 1, 550.90.07\n"
    fields = ["index", "name", "memory.total", "memory.free", "driver_version"]
    assert nvidia_smi.parse_query_csv(with_header) == nvidia_smi.parse_query_csv(bare, fields=fields)
    with pytest.raises(NvidiaSmiError, match="no header line and no field list"):
        nvidia_smi.parse_query_csv(bare)


def test_csv_unknown_values_become_none_and_bad_numbers_are_named() -> None:
    fields = [
        "index",
        "name",
        "memory.total",
        "memory.free",
        "driver_version",
        "compute_cap",
        "mig.mode.current",
    ]
    result = nvidia_smi.parse_query_csv(
        "0, Tesla T4, 15109, [N/A], 470.1, [Not Supported], [N/A]\n", fields=fields
    )
    gpu = result.gpus[0]
    assert (gpu.vram_free_bytes, gpu.compute_capability, gpu.mig_mode) == (None, None, None)
    # A value the driver could not read is missing, like any other bracketed one; the row stands.
    unreadable = nvidia_smi.parse_query_csv(
        "0, Tesla T4, [Unknown Error], 1, 470.1, 7.5, [N/A]\n", fields=fields
    )
    assert (unreadable.gpus[0].name, unreadable.gpus[0].vram_total_bytes) == ("Tesla T4", None)
    with pytest.raises(NvidiaSmiError, match=r"GPU memory.total: 'lots' is not a number of MiB"):
        nvidia_smi.parse_query_csv("0, Tesla T4, lots, 1, 470.1, 7.5, [N/A]\n", fields=fields)


def test_warning_lines_mixed_into_the_csv_are_kept_apart() -> None:
    fields = ["index", "name", "memory.total", "memory.free", "driver_version"]
    text = "WARNING: infoROM is corrupted at gpu 0000:04:00.0\n0, Tesla T4, 15109, 15000, 470.1\n"
    result = nvidia_smi.parse_query_csv(text, fields=fields)
    assert [gpu.name for gpu in result.gpus] == ["Tesla T4"]
    assert result.warnings == ["WARNING: infoROM is corrupted at gpu 0000:04:00.0"]


def test_cuda_version_from_every_header_style() -> None:
    assert (
        nvidia_smi.parse_cuda_version(
            "| NVIDIA-SMI 550.90.07  Driver Version: 550.90.07  CUDA Version: 12.4 |"
        )
        == "12.4"
    )
    assert (
        nvidia_smi.parse_cuda_version("| NVIDIA-SMI 610.62   KMD Version: 610.62   CUDA UMD Version: 13.3  |")
        == "13.3"
    )
    assert nvidia_smi.parse_cuda_version("CUDA Version     : 13.3 [Deprecated; will be removed]") == "13.3"
    assert nvidia_smi.parse_cuda_version('CUDA version : Deprecated, see "CUDA UMD version" instead') is None


@pytest.mark.parametrize("recording", ["table.txt", "q.txt"])
def test_own_fixtures_read_the_same_in_every_shape(recording: str) -> None:
    for fixture in ("lab-2x-l4", "old-driver", "h100-drv580"):
        from_csv = nvidia_smi.parse_query_csv((FIXTURES / fixture / "query-gpu.csv").read_text())
        other = nvidia_smi.parse_recorded((FIXTURES / fixture / recording).read_text())
        assert [(g.index, g.name, g.vram_total_bytes) for g in other.gpus] == [
            (g.index, g.name, g.vram_total_bytes) for g in from_csv.gpus
        ]
        assert other.driver_version == from_csv.driver_version


# --- complete outputs of machines the shared folder does not hold --------------------------------------
# The shared recordings hold no Grace-Blackwell machine, no driver old enough to print MB, no MIG table whose
# GPU row prints N/A and no CSV run with -i. These are written here in the layouts those drivers print (the
# GB10 layout as public bug reports show it: NVIDIA/k8s-device-plugin#1482, marimo-team/marimo#6822), with
# made-up values.

GB10_TABLE = """\
Thu Nov 20 09:12:01 2025
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 580.95.05              Driver Version: 580.95.05      CUDA Version: 13.0     |
+-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |
|                                         |                        |               MIG M. |
|=========================================+========================+======================|
|   0  NVIDIA GB10                    On  |   0000000F:01:00.0 Off |                  N/A |
| N/A   41C    P8              5W /  N/A  | Not Supported          |      0%      Default |
|                                         |                        |                  N/A |
+-----------------------------------------+------------------------+----------------------+

+-----------------------------------------------------------------------------------------+
| Processes:                                                                              |
|  GPU   GI   CI              PID   Type   Process name                        GPU Memory |
|        ID   ID                                                               Usage      |
|=========================================================================================|
|  No running processes found                                                             |
+-----------------------------------------------------------------------------------------+
"""

GB10_QUERY_CSV = (
    "index, uuid, name, driver_version, memory.total [MiB], memory.free [MiB], compute_cap, "
    "mig.mode.current, persistence_mode, ecc.errors.uncorrected.volatile.total\n"
    "0, GPU-6f1d0c2e-0b7a-4c59-8e21-5a3b9d7c4e10, NVIDIA GB10, 580.95.05, [N/A], [N/A], 12.1, [N/A], "
    "Enabled, [N/A]\n"
)

# An A100 pair on a 450-era driver, MIG on for GPU 0: its row prints N/A, its MIG devices carry the memory.
MIG_NA_TABLE = """\
+-----------------------------------------------------------------------------+
| NVIDIA-SMI 450.80.02    Driver Version: 450.80.02    CUDA Version: 11.0     |
|-------------------------------+----------------------+----------------------+
| GPU  Name        Persistence-M| Bus-Id        Disp.A | Volatile Uncorr. ECC |
| Fan  Temp  Perf  Pwr:Usage/Cap|         Memory-Usage | GPU-Util  Compute M. |
|                               |                      |               MIG M. |
|===============================+======================+======================|
|   0  A100-SXM4-40GB      On   | 00000000:00:04.0 Off |                   On |
| N/A   33C    P0    63W / 400W |                  N/A |     N/A      Default |
|                               |                      |              Enabled |
+-------------------------------+----------------------+----------------------+
|   1  A100-SXM4-40GB      On   | 00000000:00:05.0 Off |                    0 |
| N/A   31C    P0    60W / 400W |      0MiB / 40537MiB |      0%      Default |
|                               |                      |             Disabled |
+-------------------------------+----------------------+----------------------+

+-----------------------------------------------------------------------------+
| MIG devices:                                                                |
+------------------+----------------------+-----------+-----------------------+
| GPU  GI  CI  MIG |         Memory-Usage |        Vol|         Shared        |
|      ID  ID  Dev |           BAR1-Usage | SM     Unc| CE  ENC  DEC  OFA  JPG|
|                  |                      |        ECC|                       |
|==================+======================+===========+=======================|
|  0    1   0   0  |      3MiB / 20096MiB | 42      0 |  3   0    2    0    0 |
|                  |      0MiB / 32767MiB |           |                       |
+------------------+----------------------+-----------+-----------------------+
|  0    2   0   1  |     13MiB / 20096MiB | 42      0 |  3   0    2    0    0 |
|                  |      0MiB / 32767MiB |           |                       |
+------------------+----------------------+-----------+-----------------------+

+-----------------------------------------------------------------------------+
| Processes:                                                                  |
|  GPU   GI   CI        PID   Type   Process name                  GPU Memory |
|=============================================================================|
|  No running processes found                                                 |
+-----------------------------------------------------------------------------+
"""

# A 319-era driver: MB for what later drivers call MiB, two lines per GPU, "Compute processes".
MB_TABLE = """\
+------------------------------------------------------+
| NVIDIA-SMI 5.319.37   Driver Version: 319.37         |
|-------------------------------+----------------------+----------------------+
| GPU  Name        Persistence-M| Bus-Id        Disp.A | Volatile Uncorr. ECC |
| Fan  Temp  Perf  Pwr:Usage/Cap|         Memory-Usage | GPU-Util  Compute M. |
|===============================+======================+======================|
|   0  Tesla K20m          Off  | 0000:02:00.0     Off |                    0 |
| N/A   30C    P0    49W / 225W |       11MB /  4799MB |      0%      Default |
+-------------------------------+----------------------+----------------------+
|   1  Tesla K20m          Off  | 0000:03:00.0     Off |                    0 |
| N/A   32C    P0    50W / 225W |      112MB /  4799MB |     99%      Default |
+-------------------------------+----------------------+----------------------+

+-----------------------------------------------------------------------------+
| Compute processes:                                               GPU Memory |
|  GPU       PID  Process name                                     Usage      |
|=============================================================================|
|  No running compute processes found                                         |
+-----------------------------------------------------------------------------+
"""

MB_QUERY_TEXT = """\

==============NVSMI LOG==============

Timestamp                       : Mon Sep  2 10:00:00 2013
Driver Version                  : 319.37

Attached GPUs                   : 1
GPU 0000:02:00.0
    Product Name                : Tesla K20m
    Display Mode                : Disabled
    Persistence Mode            : Disabled
    Serial Number               : 0000000000000
    GPU UUID                    : GPU-0c5f8a3e-7d21-4b9a-a0e4-2f6b1d8c3a57
    FB Memory Usage
        Total                   : 4799 MB
        Used                    : 11 MB
        Free                    : 4788 MB
    Compute Processes           : None
"""

# `nvidia-smi -q -d MEMORY`: a complete output of the sections asked for, which leave out the name.
MEMORY_ONLY_QUERY_TEXT = """\

==============NVSMI LOG==============

Timestamp                                 : Mon Nov 24 10:00:00 2025
Driver Version                            : 550.90.07
CUDA Version                              : 12.4

Attached GPUs                             : 1
GPU 00000000:38:00.0
    FB Memory Usage
        Total                             : 23034 MiB
        Free                              : 22599 MiB
"""


def _lab_q() -> str:
    return (FIXTURES / "lab-2x-l4" / "q.txt").read_text()


def test_grace_blackwell_table_reads_the_gpu_and_reports_memory_missing() -> None:
    result = nvidia_smi.parse_recorded(GB10_TABLE)
    (gpu,) = result.gpus
    assert (result.driver_version, result.cuda_version) == ("580.95.05", "13.0")
    assert (gpu.index, gpu.name, gpu.vram_total_bytes, gpu.vram_free_bytes) == (0, "NVIDIA GB10", None, None)
    assert (gpu.persistence_mode, gpu.mig_mode, gpu.known_vram_total_bytes()) == ("Enabled", None, None)


def test_grace_blackwell_query_reads_the_gpu_and_reports_memory_missing() -> None:
    (gpu,) = nvidia_smi.parse_recorded(GB10_QUERY_CSV).gpus
    assert (gpu.index, gpu.name, gpu.compute_capability) == (0, "NVIDIA GB10", "12.1")
    assert (gpu.vram_total_bytes, gpu.vram_free_bytes, gpu.ecc_uncorrected) == (None, None, None)


def test_query_text_reads_not_supported_memory_as_missing() -> None:
    text = _lab_q().replace(": 23034 MiB", ": Not Supported").replace(": 22599 MiB", ": Not Supported")
    result = nvidia_smi.parse_query_text(text)
    assert [(g.index, g.name, g.vram_total_bytes, g.vram_free_bytes) for g in result.gpus] == [
        (0, "NVIDIA L4", None, None),
        (1, "NVIDIA L4", None, None),
    ]


def test_probe_on_grace_blackwell_reports_memory_missing_not_a_cut_off_output(monkeypatch, tmp_path) -> None:
    (tmp_path / "query-gpu.csv").write_text(GB10_QUERY_CSV)
    (tmp_path / "table.txt").write_text(GB10_TABLE)
    monkeypatch.setenv("NVIDIA_SMI_STANDIN_FIXTURE", str(tmp_path))
    result = nvidia_smi.probe(str(STANDIN))
    assert (result.driver_version, result.cuda_version) == ("580.95.05", "13.0")
    assert [(g.index, g.name, g.vram_total_bytes, g.compute_capability) for g in result.gpus] == [
        (0, "NVIDIA GB10", None, "12.1")
    ]


def test_mig_table_whose_gpu_row_prints_na_reads_memory_from_its_mig_devices() -> None:
    result = nvidia_smi.parse_recorded(MIG_NA_TABLE)
    mig_gpu, plain_gpu = result.gpus
    assert (mig_gpu.index, mig_gpu.name, mig_gpu.mig_mode, mig_gpu.vram_total_bytes) == (
        0,
        "A100-SXM4-40GB",
        "Enabled",
        None,
    )
    devices = [
        (d["gpu_instance_id"], d["vram_total_bytes"], d["vram_free_bytes"]) for d in mig_gpu.mig_devices
    ]
    assert devices == [(1, 20096 * MIB, 20093 * MIB), (2, 20096 * MIB, 20083 * MIB)]
    assert mig_gpu.known_vram_total_bytes() == 2 * 20096 * MIB
    assert (plain_gpu.index, plain_gpu.vram_total_bytes, plain_gpu.mig_mode) == (1, 40537 * MIB, "Disabled")
    assert plain_gpu.known_vram_total_bytes() == 40537 * MIB


def test_table_memory_cell_unknown_on_both_sides_is_missing_and_nonsense_is_named() -> None:
    both_unknown = MIG_NA_TABLE.replace("|                  N/A |", "|          N/A /  N/A  |")
    assert nvidia_smi.parse_table(both_unknown).gpus[0].vram_total_bytes is None
    nonsense = MIG_NA_TABLE.replace("|                  N/A |", "|           12 parrots |")
    with pytest.raises(NvidiaSmiError, match=r"GPU 0's memory from the nvidia-smi table: '12 parrots'"):
        nvidia_smi.parse_table(nonsense)


def test_old_driver_that_prints_mb_is_read_as_mib() -> None:
    table = nvidia_smi.parse_recorded(MB_TABLE)
    assert (table.driver_version, table.cuda_version) == ("319.37", None)
    assert [(g.index, g.name, g.vram_total_bytes, g.mig_mode) for g in table.gpus] == [
        (0, "Tesla K20m", 4799 * MIB, None),
        (1, "Tesla K20m", 4799 * MIB, None),
    ]
    query = nvidia_smi.parse_recorded(MB_QUERY_TEXT)
    (gpu,) = query.gpus
    assert (query.driver_version, gpu.index, gpu.name) == ("319.37", 0, "Tesla K20m")
    assert (gpu.vram_total_bytes, gpu.vram_free_bytes) == (4799 * MIB, 4788 * MIB)
    fields = ["index", "name", "memory.total", "memory.free", "driver_version"]
    csv_row = nvidia_smi.parse_query_csv("0, Tesla K20m, 4799 MB, 4788 MB, 319.37\n", fields=fields)
    assert csv_row.gpus[0].vram_total_bytes == 4799 * MIB


def test_csv_query_run_with_i_has_no_index_and_is_read() -> None:
    text = (
        "name, uuid, memory.total [MiB], memory.free [MiB], driver_version\n"
        "NVIDIA L4, GPU-7c4e2f90-13ad-4b8e-a5c6-3d9f0b1e2a47, 23034 MiB, 22599 MiB, 550.90.07\n"
    )
    result = nvidia_smi.parse_recorded(text)
    (gpu,) = result.gpus
    assert (gpu.index, gpu.name, gpu.vram_total_bytes, gpu.vram_free_bytes) == (
        None,
        "NVIDIA L4",
        23034 * MIB,
        22599 * MIB,
    )
    assert result.driver_version == "550.90.07"


def test_query_text_run_with_i_is_read_without_an_index() -> None:
    full = _lab_q()
    one_gpu = full[: full.index("GPU 00000000:3A:00.0")]  # "Attached GPUs: 2", one whole section
    (gpu,) = nvidia_smi.parse_query_text(one_gpu).gpus
    assert (gpu.index, gpu.uuid, gpu.vram_total_bytes) == (
        None,
        "GPU-1ab0c7d2-5e3f-4a61-9b8d-0c2f7e4a9b10",
        23034 * MIB,
    )


def test_query_text_cut_inside_a_gpu_section_is_refused_as_cut_off() -> None:
    full = _lab_q()
    cut = full[: full.index("    Processes", full.index("GPU 00000000:3A:00.0"))]
    with pytest.raises(NvidiaSmiError, match=r"cut off: the section of GPU 00000000:3A:00.0 stops") as caught:
        nvidia_smi.parse_query_text(cut)
    assert caught.value.kind == "garbled"


def test_query_text_with_selected_sections_is_refused_for_its_missing_name_not_as_cut_off() -> None:
    with pytest.raises(NvidiaSmiError) as caught:
        nvidia_smi.parse_query_text(MEMORY_ONLY_QUERY_TEXT)
    assert "no product name for GPU 00000000:38:00.0" in str(caught.value)
    assert "cut" not in str(caught.value)


def test_table_cut_inside_a_gpu_box_is_refused_as_cut_off() -> None:
    cut = MB_TABLE[: MB_TABLE.index("| N/A   32C")]  # GPU 1's name row, then nothing
    with pytest.raises(NvidiaSmiError, match=r"table is cut off: the box of GPU 1 \(Tesla K20m\)"):
        nvidia_smi.parse_recorded(cut)


@pytest.mark.parametrize(
    "text",
    [GB10_TABLE, GB10_QUERY_CSV, MIG_NA_TABLE, MB_TABLE, MB_QUERY_TEXT],
    ids=["gb10-table", "gb10-query-csv", "mig-na-table", "mb-table", "mb-q"],
)
def test_a_complete_output_is_read_not_refused(text: str) -> None:
    result = nvidia_smi.parse_recorded(text)
    assert result.gpus and all(gpu.name for gpu in result.gpus)


# --- the stand-in itself -------------------------------------------------------------------------------


def _standin(*args: str, fixture: str = "lab-2x-l4") -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(STANDIN), *args], env=standin_env(fixture), capture_output=True, text=True, timeout=20
    )


def test_standin_says_it_is_a_standin() -> None:
    answer = _standin("--version")
    assert answer.returncode == 0 and "STAND-IN for nvidia-smi" in answer.stdout
    assert "stand-in" in STANDIN.read_text().splitlines()[1].lower()


def test_standin_answers_the_fields_asked_in_order_and_rejects_unknown_ones() -> None:
    answer = _standin("--query-gpu=name,index,memory.total", "--format=csv,noheader,nounits")
    assert answer.stdout.splitlines() == ["NVIDIA L4, 0, 23034", "NVIDIA L4, 1, 23034"]
    with_units = _standin("--query-gpu=memory.total", "--format=csv")
    assert with_units.stdout.splitlines() == ["memory.total [MiB]", "23034 MiB", "23034 MiB"]
    old = _standin("--query-gpu=index,compute_cap", "--format=csv", fixture="old-driver")
    assert old.returncode == 2 and 'Field "compute_cap" is not a valid field to query.' in old.stdout


def test_standin_finds_its_fixture_from_the_file_beside_it(tmp_path: Path) -> None:
    copy = tmp_path / "nvidia-smi-standin"
    copy.write_text(STANDIN.read_text())
    copy.chmod(0o755)
    (tmp_path / "nvidia-smi-standin.fixture").write_text(str(FIXTURES / "old-driver") + "\n")
    env = standin_env()
    env.pop("NVIDIA_SMI_STANDIN_FIXTURE")
    answer = subprocess.run([str(copy)], env=env, capture_output=True, text=True, timeout=20)
    assert "Driver Version: 470.182.03" in answer.stdout


def test_parser_is_stdlib_only_and_python39_syntax() -> None:
    # It runs on target hosts inside Ansible modules, where only the standard library is sure to exist.
    source = (REPO_ROOT / "plugins" / "module_utils" / "nvidia_smi.py").read_text()
    tree = ast.parse(source, feature_version=(3, 9))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert {name.split(".")[0] for name in imported} <= set(sys.stdlib_module_names) | {"__future__"}
