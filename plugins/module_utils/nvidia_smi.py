# Copyright: llorch-kit contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# The one nvidia-smi parser of the kit: the pool-managerd agent and the nvidia_gpu_facts module both use it.
"""Run nvidia-smi and read what it prints, defensively.

Standard library only, no Ansible imports, Python 3.9+: this file is shipped inside Ansible modules
(``ansible.module_utils.nvidia_smi``) and inside the pool-managerd package (a symlink).

API
---
``probe(nvidia_smi="nvidia-smi", timeout=10.0, with_cuda=True) -> ProbeResult``
    Runs ``--query-gpu=<QUERY_FIELDS> --format=csv,noheader,nounits`` (dropping optional fields an old
    driver rejects, such as ``compute_cap`` before ~510) and the plain ``nvidia-smi`` header (``-q`` as a
    fallback) for the CUDA version. Raises ``NvidiaSmiError`` on any failure.
``ProbeResult``: ``driver_version``, ``cuda_version``, ``gpus`` (list of ``GpuInfo``), ``warnings`` (the
    ``WARNING: ...`` lines nvidia-smi mixed into its output, e.g. a corrupt infoROM), ``as_dict()``.
``GpuInfo``: ``index``, ``uuid``, ``name``, ``vram_total_bytes``, ``vram_free_bytes``,
    ``compute_capability``, ``mig_mode`` ("Enabled"/"Disabled"/None), ``persistence_mode``
    ("Enabled"/"Disabled"/None), ``ecc_uncorrected`` (int or None), ``mig_devices`` (list of dicts), and
    ``known_vram_total_bytes()`` (the GPU's total, else the sum of its MIG devices' totals, else None).
    A value the output does not carry is None: printed as unknown (``N/A``, ``[Not Supported]``, ...) or
    not printed at all. VRAM bytes = MiB x 1,048,576 (old drivers print ``MB`` for the same MiB).
    What can be None besides the optional fields above:
    - ``vram_total_bytes``: on unified-memory GPUs (Grace-Blackwell GB10/GB200 print "Not Supported" or
      ``[N/A]``) and on MIG-enabled GPUs whose table row prints N/A (their MIG devices carry the memory).
      ``probe()`` gives None here too: the driver does not know it.
    - ``index``: only from recordings that do not say it (a CSV without the index column, ``-q``/XML
      run with ``-i`` that show fewer GPUs than are attached). ``probe()`` always asks for the index.
    - ``ProbeResult.driver_version``: only from a CSV recording without the driver_version column.
    Only output that is cut off (a CSV row short of values, a ``-q`` GPU section without its end, a table
    GPU box without its closing border, malformed XML) or that is not nvidia-smi output is refused.
``NvidiaSmiError(message, kind, output)``: ``kind`` is one of ERROR_KINDS; the message says "driver" or
    "GPU" and quotes what nvidia-smi printed.
Parsers of recorded text: ``parse_query_csv`` (with or without header/units), ``parse_query_text`` (``-q``),
    ``parse_query_xml`` (``-q -x``), ``parse_table`` (plain ``nvidia-smi``), ``parse_capture`` (a
    multi-section capture), ``parse_recorded`` (sniffs which of these it is), ``parse_cuda_version``,
    ``parse_driver_version``, ``classify_failure``.
"""

from __future__ import annotations

import contextlib
import csv
import re
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from xml.etree import ElementTree

MIB = 1024 * 1024

# What the kit asks of every GPU. The first five are required; the driver may reject the others
# (compute_cap appeared around driver 510), and then the probe asks again without them.
QUERY_FIELDS = (
    "index",
    "uuid",
    "name",
    "memory.total",
    "memory.free",
    "driver_version",
    "compute_cap",
    "mig.mode.current",
    "persistence_mode",
    "ecc.errors.uncorrected.volatile.total",
)
REQUIRED_FIELDS = ("index", "name", "memory.total", "memory.free", "driver_version")

ERROR_KINDS = (
    "not-found",  # no nvidia-smi binary: no driver installed
    "not-executable",
    "timeout",  # nvidia-smi hung: usually a hung driver or GPU
    "no-devices",  # driver loaded, no GPU visible
    "driver-mismatch",  # kernel module and user-space library differ (upgrade without reboot)
    "no-driver",  # nvidia-smi could not talk to the kernel driver
    "nvml",  # any other NVML initialisation failure
    "gpu-lost",  # a GPU fell off the bus or needs a reset
    "unsupported-field",  # the driver does not know a --query-gpu field
    "garbled",  # output cut off or not in the expected shape
    "failed",  # any other non-zero exit
)

# (kind, what nvidia-smi says, what it means to an operator)
_KNOWN_FAILURES = (
    ("no-devices", "No devices were found", "the NVIDIA driver sees no GPU on this host"),
    (
        "driver-mismatch",
        "Driver/library version mismatch",
        "the loaded NVIDIA kernel driver and the user-space driver library differ (a driver upgrade "
        "without a reboot?); reboot or reload the nvidia kernel modules",
    ),
    (
        "no-driver",
        "couldn't communicate with the NVIDIA driver",
        "nvidia-smi cannot reach the NVIDIA kernel driver; install it or load it (modprobe nvidia)",
    ),
    (
        "no-driver",
        "couldn't find libnvidia-ml.so",
        "the NVIDIA driver library (libnvidia-ml.so) is missing; install the driver",
    ),
    ("gpu-lost", "GPU is lost", "a GPU fell off the bus; the driver needs a reboot to recover it"),
    ("gpu-lost", "GPU requires reset", "a GPU needs a reset before the driver can use it"),
    ("nvml", "Failed to initialize NVML", "the NVIDIA driver's management library failed to start"),
    ("gpu-lost", "Unable to determine the device handle", "the driver cannot reach a GPU"),
)
_INVALID_FIELD = re.compile(r'Field "([^"]+)" is not a valid field to query')
_BRACKETED = re.compile(r"^\[.*\]$")
_UNITS_SUFFIX = re.compile(r"\s*\[[^\]]*\]$")
_FIELD_NAME = re.compile(r"^[a-z][A-Za-z0-9_.]*$")
_CUDA_VERSION = re.compile(r"CUDA (?:UMD )?Version\s*:\s*([0-9]+\.[0-9]+)", re.IGNORECASE)
_DRIVER_VERSION = re.compile(r"(?:Driver|KMD) Version\s*:\s*([0-9]+(?:\.[0-9]+)+)", re.IGNORECASE)
_GPU_BLOCK = re.compile(r"^GPU [0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-9A-Fa-f]\s*$")
_CAPTURE_BANNER = re.compile(r"^#{20,}\s*$")
_WARNING_LINE = re.compile(r"^\s*WARNING:", re.IGNORECASE)


class NvidiaSmiError(Exception):
    """nvidia-smi failed or printed something we cannot read; the message is meant for an operator."""

    def __init__(self, message: str, kind: str = "failed", output: str = "", field_name: str = ""):
        super().__init__(message)
        self.kind = kind
        self.output = output
        self.field_name = field_name


@dataclass
class GpuInfo:
    index: int | None  # None only where a recording does not say it (see the module docstring)
    uuid: str | None
    name: str
    vram_total_bytes: int | None  # None where nvidia-smi does not know it (unified memory, some MIG rows)
    vram_free_bytes: int | None
    compute_capability: str | None = None
    mig_mode: str | None = None
    persistence_mode: str | None = None
    ecc_uncorrected: int | None = None
    mig_devices: list = field(default_factory=list)

    def known_vram_total_bytes(self) -> int | None:
        """The GPU's total VRAM; for a MIG GPU that does not print it, what its MIG devices hold together.

        The MIG sum leaves out memory no MIG instance owns, which no engine can use anyway.
        """
        if self.vram_total_bytes is not None:
            return self.vram_total_bytes
        totals = [device.get("vram_total_bytes") for device in self.mig_devices]
        if totals and all(total is not None for total in totals):
            return sum(totals)
        return None


@dataclass
class ProbeResult:
    driver_version: str | None
    cuda_version: str | None
    gpus: list = field(default_factory=list)
    # Lines such as "WARNING: infoROM is corrupted at gpu 0000:04:00.0" that nvidia-smi mixes into its output.
    warnings: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Small value readers


def quote_output(output: str, limit: int = 300) -> str:
    """What nvidia-smi said, on one line and bounded, for an error message."""
    lines = [line.strip() for line in (output or "").splitlines() if line.strip()]
    text = " / ".join(lines) or "(no output)"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return "'" + text + "'"


# How nvidia-smi says "unknown" outside brackets (the table and -q; the CSV brackets them: "[N/A]").
_UNKNOWN_WORDS = frozenset(
    ("n/a", "none", "not supported", "unknown error", "err!", "insufficient permissions")
)


def _value(raw: str | None) -> str | None:
    """A cell as a string, or None for the many ways nvidia-smi says 'unknown'."""
    if raw is None:
        return None
    text = raw.strip()
    if not text or text.lower() in _UNKNOWN_WORDS or _BRACKETED.match(text):
        return None
    # 610+ appends "[Deprecated; ...]" to some values: keep the value itself.
    text = re.sub(r"\s*\[[^\]]*\]$", "", text)
    return text or None


def _mib(raw: str | None, what: str) -> int | None:
    text = _value(raw)
    if text is None:
        return None
    # Drivers before ~340 print "MB" for the same binary megabytes that later ones call "MiB".
    match = re.match(r"^([0-9]+(?:\.[0-9]+)?)\s*(MiB|MB)?$", text)
    if not match:
        raise NvidiaSmiError(f"could not read GPU {what}: {text!r} is not a number of MiB", kind="garbled")
    return int(float(match.group(1)) * MIB)


def _int(raw: str | None) -> int | None:
    text = _value(raw)
    if text is None or not re.match(r"^[0-9]+$", text):
        return None
    return int(text)


def _mode(raw: str | None) -> str | None:
    """Enabled/Disabled from the several spellings nvidia-smi uses (the table says On/Off)."""
    text = _value(raw)
    if text is None:
        return None
    lowered = text.lower()
    if lowered in ("enabled", "on", "yes"):
        return "Enabled"
    if lowered in ("disabled", "off", "no"):
        return "Disabled"
    return None


def parse_cuda_version(text: str) -> str | None:
    """The CUDA version the driver supports, from the table header, ``-q`` or ``--version``."""
    match = _CUDA_VERSION.search(text or "")
    return match.group(1) if match else None


def parse_driver_version(text: str) -> str | None:
    match = _DRIVER_VERSION.search(text or "")
    return match.group(1) if match else None


def _need(value: Any, what: str, where: str, why: str = "") -> Any:
    """`value`, or a refusal naming what is missing; `why` says what its absence means, when known."""
    if value is None:
        raise NvidiaSmiError(
            f"nvidia-smi output gives no {what} {where}" + (f" ({why})" if why else ""), kind="garbled"
        )
    return value


# ---------------------------------------------------------------------------------------------------------
# Failures


def classify_failure(output: str, returncode: int | None = None) -> NvidiaSmiError | None:
    """An NvidiaSmiError for output that reports a known driver/GPU failure, else None."""
    text = output or ""
    invalid = _INVALID_FIELD.search(text)
    if invalid:
        return NvidiaSmiError(
            f"the NVIDIA driver's nvidia-smi does not know the GPU query field {invalid.group(1)!r} "
            f"(older driver?): nvidia-smi said {quote_output(text)}",
            kind="unsupported-field",
            output=text,
            field_name=invalid.group(1),
        )
    for kind, needle, meaning in _KNOWN_FAILURES:
        if needle.lower() in text.lower():
            return NvidiaSmiError(f"{meaning}: nvidia-smi said {quote_output(text)}", kind=kind, output=text)
    if returncode:
        return NvidiaSmiError(
            f"nvidia-smi failed with exit code {returncode} (GPU driver problem?): nvidia-smi said "
            f"{quote_output(text)}",
            kind="failed",
            output=text,
        )
    return None


def run_nvidia_smi(args: list, nvidia_smi: str = "nvidia-smi", timeout: float = 10.0) -> str:
    """Run nvidia-smi with `args`; return stdout or raise NvidiaSmiError.

    Never waits much past `timeout`: a hung nvidia-smi is killed, and one stuck inside the driver (which
    SIGKILL does not end until it leaves the kernel) is abandoned after KILL_WAIT_S, not waited for.
    """
    command = [nvidia_smi, *args]
    try:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
    except FileNotFoundError:
        raise NvidiaSmiError(
            f"nvidia-smi not found at {nvidia_smi!r}: the NVIDIA driver is not installed on this host "
            "(or the configured nvidia-smi path is wrong)",
            kind="not-found",
        ) from None
    except PermissionError:
        raise NvidiaSmiError(
            f"nvidia-smi at {nvidia_smi!r} is not executable: check the NVIDIA driver install",
            kind="not-executable",
        ) from None
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _abandon(proc)
        raise NvidiaSmiError(
            f"nvidia-smi did not answer within {timeout:g} s: the GPU driver may be hung "
            "(look for Xid errors in the kernel log)",
            kind="timeout",
        ) from None
    output = (stdout or "") + (stderr or "")
    failure = classify_failure(output, proc.returncode)
    if failure is not None:
        raise failure
    return stdout


# How long to wait for a killed nvidia-smi to go: one stuck in the kernel may never, and is left behind.
KILL_WAIT_S = 2.0


def _abandon(proc: subprocess.Popen) -> None:
    """Kill a hung nvidia-smi and reap it if it goes within KILL_WAIT_S; never wait longer."""
    with contextlib.suppress(OSError):
        proc.kill()
    try:
        proc.communicate(timeout=KILL_WAIT_S)
    except (subprocess.TimeoutExpired, OSError, ValueError):
        # Still running (stuck in the driver) or its pipes held open by a child: close our ends and go.
        # subprocess reaps it later (Popen keeps a list of unfinished children).
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


# ---------------------------------------------------------------------------------------------------------
# --query-gpu CSV


def _field_name(cell: str) -> str:
    """'memory.total [MiB]' -> 'memory.total'."""
    return _UNITS_SUFFIX.sub("", cell.strip())


def _looks_like_header(cells: list) -> bool:
    names = [_field_name(cell) for cell in cells]
    return bool(names) and all(_FIELD_NAME.match(name) for name in names) and "name" in names


def parse_query_csv(text: str, fields: list | None = None) -> ProbeResult:
    """Read ``--query-gpu`` CSV; `fields` names the columns when the output has no header line."""
    failure = classify_failure(text)
    if failure is not None:
        raise failure
    lines = [line for line in (text or "").splitlines() if line.strip()]
    warnings = [line.strip() for line in lines if _WARNING_LINE.match(line)]
    rows = list(csv.reader([line for line in lines if not _WARNING_LINE.match(line)], skipinitialspace=True))
    if rows and _looks_like_header(rows[0]):
        fields = [_field_name(cell) for cell in rows[0]]
        rows = rows[1:]
    if fields is None:
        raise NvidiaSmiError(
            "nvidia-smi GPU query output has no header line and no field list was given", kind="garbled"
        )
    fields = list(fields)
    # A column that was not asked for is missing, not an error: `--query-gpu` prints what it was asked,
    # and a query run with `-i` often leaves out the index. Only the name says which GPU a row is.
    if "name" not in fields:
        raise NvidiaSmiError(
            f"nvidia-smi GPU query output has no name column (it has: {', '.join(fields[:12])}"
            f"{', ...' if len(fields) > 12 else ''}): cannot tell which GPUs it describes",
            kind="garbled",
        )
    if not rows:
        raise NvidiaSmiError(
            f"nvidia-smi GPU query printed no GPU rows: {quote_output(text)}", kind="garbled", output=text
        )
    gpus, drivers = [], []
    for number, row in enumerate(rows, start=1):
        if len(row) != len(fields):
            raise NvidiaSmiError(
                f"nvidia-smi GPU query row {number} has {len(row)} values where {len(fields)} were asked "
                f"(cut-off output?): {quote_output(','.join(row))}",
                kind="garbled",
                output=text,
            )
        record = dict(zip(fields, row))  # noqa: B905 -- lengths checked above; strict= needs 3.10
        index = _int(record.get("index"))
        if "index" in record:  # asked for, so nvidia-smi printed it: a row without one is not a GPU row
            index = _need(index, "GPU index", f"in row {number}", "the row is not a GPU's")
        label = str(index) if index is not None else f"in row {number}"
        gpus.append(
            GpuInfo(
                index=index,
                uuid=_value(record.get("uuid")),
                name=_need(_value(record.get("name")), "name", f"for GPU {label}"),
                vram_total_bytes=_mib(record.get("memory.total"), "memory.total"),
                vram_free_bytes=_mib(record.get("memory.free"), "memory.free"),
                compute_capability=_value(record.get("compute_cap")),
                mig_mode=_mode(record.get("mig.mode.current")),
                persistence_mode=_mode(record.get("persistence_mode")),
                ecc_uncorrected=_int(record.get("ecc.errors.uncorrected.volatile.total")),
            )
        )
        drivers.append(_value(record.get("driver_version")))
    return ProbeResult(driver_version=drivers[0], cuda_version=None, gpus=gpus, warnings=warnings)


# ---------------------------------------------------------------------------------------------------------
# nvidia-smi -q (indented text)


def _indented_entries(lines: list) -> list:
    """[(path tuple, value or None)] for 'Key : Value' lines nested by indentation."""
    entries, stack = [], []  # stack of (indent, key)
    for line in lines:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        key, sep, value = line.strip().partition(":")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = key.strip()
        path = (*(name for _indent, name in stack), key)
        entries.append((path, value.strip() if sep else None))
        if not sep:
            stack.append((indent, key))
    return entries


def _first(entries: list, *path: str) -> str | None:
    for entry_path, value in entries:
        if entry_path == path:
            return value
    return None


def _gpu_from_text_block(index: int | None, label: str, lines: list) -> GpuInfo:
    entries = _indented_entries(lines)
    mig_devices, current = [], None
    own = []  # entries of the GPU itself, not of its MIG devices
    for path, value in entries:
        if path[0] == "MIG Device":
            if len(path) == 1:
                current = {}
                mig_devices.append(current)
                continue
            if current is not None and path[1:] in (
                ("Index",),
                ("GPU Instance ID",),
                ("Compute Instance ID",),
            ):
                current[path[1].lower().replace(" ", "_")] = _int(value)
            elif (
                current is not None
                and path[1].endswith("FB Memory Usage")
                and path[2:]
                in (
                    ("Total",),
                    ("Free",),
                )
            ):
                current["vram_" + path[2].lower() + "_bytes"] = _mib(value, "MIG memory")
            continue
        own.append((path, value))
    ecc_values = [
        _int(value)
        for path, value in own
        if path[:2] == ("ECC Errors", "Volatile")
        and (any("Uncorrectable" in part for part in path[2:]) or path[2:] == ("Double Bit", "Total"))
    ]
    ecc_known = [value for value in ecc_values if value is not None]
    return GpuInfo(
        index=index,
        uuid=_value(_first(own, "GPU UUID")),
        name=_need(_value(_first(own, "Product Name")), "product name", f"for GPU {label}"),
        # "Not Supported" / "N/A" on unified-memory GPUs (Grace-Blackwell): missing, not an error.
        vram_total_bytes=_mib(_first(own, "FB Memory Usage", "Total"), "memory"),
        vram_free_bytes=_mib(_first(own, "FB Memory Usage", "Free"), "memory"),
        compute_capability=None,  # -q does not print it
        mig_mode=_mode(_first(own, "MIG Mode", "Current")),
        persistence_mode=_mode(_first(own, "Persistence Mode")),
        ecc_uncorrected=sum(ecc_known) if ecc_known else None,
        mig_devices=mig_devices,
    )


def _text_block_is_whole(lines: list) -> bool:
    """Whether a -q GPU section reaches its end: every driver prints a top-level Processes entry in it
    ("Processes", "Compute Processes" on old drivers), after the memory and clock sections."""
    entries = _indented_entries(lines)
    if not any(path == ("Product Name",) for path, _value in entries):
        return True  # a `-q -d ...` selection prints neither; the missing product name is refused instead
    return any(len(path) == 1 and path[0].endswith("Processes") for path, _value in entries)


def parse_query_text(text: str) -> ProbeResult:
    """Read ``nvidia-smi -q``."""
    failure = classify_failure(text)
    if failure is not None:
        raise failure
    lines = (text or "").splitlines()
    if not any("NVSMI LOG" in line for line in lines[:5]):
        raise NvidiaSmiError(f"not nvidia-smi -q output: {quote_output(text)}", kind="garbled", output=text)
    header, blocks, bus_ids = [], [], []
    for line in lines:
        if _GPU_BLOCK.match(line):
            blocks.append([])
            bus_ids.append(line.split()[1])
        elif blocks:
            blocks[-1].append(line)
        else:
            header.append(line)
    header_text = "\n".join(header)
    attached = _int(_first(_indented_entries(header), "Attached GPUs"))
    if not blocks:
        raise NvidiaSmiError(f"nvidia-smi -q lists no GPU: {quote_output(text)}", kind="garbled", output=text)
    for bus_id, block in zip(bus_ids, blocks):  # noqa: B905 -- built together above; strict= needs 3.10
        if not _text_block_is_whole(block):
            raise NvidiaSmiError(
                f"nvidia-smi -q output is cut off: the section of GPU {bus_id} stops before its Processes "
                f"entry, which nvidia-smi always prints last (describes {len(blocks)} of "
                f"{attached if attached is not None else '?'} attached GPUs)",
                kind="garbled",
            )
    if attached is not None and attached < len(blocks):
        raise NvidiaSmiError(
            f"nvidia-smi -q says {attached} GPUs are attached but describes {len(blocks)}", kind="garbled"
        )
    # Every section is whole: fewer sections than attached GPUs is a run with -i, whose indices it does not
    # print (GPUs are listed in index order only when all of them are).
    every_gpu = attached is None or attached == len(blocks)
    gpus = [
        _gpu_from_text_block(position if every_gpu else None, bus_id, block)
        for position, (bus_id, block) in enumerate(zip(bus_ids, blocks))  # noqa: B905 -- built together
    ]
    return ProbeResult(
        driver_version=_need(
            parse_driver_version(header_text),
            "driver version",
            "in its header",
            "nvidia-smi prints it always",
        ),
        cuda_version=parse_cuda_version(header_text),
        gpus=gpus,
    )


# ---------------------------------------------------------------------------------------------------------
# nvidia-smi -q -x (XML)


def _xml_text(element: Any, path: str) -> str | None:
    found = element.find(path)
    return None if found is None else _value(found.text)


def _gpu_from_xml(index: int | None, gpu: Any) -> GpuInfo:
    label = gpu.get("id") or str(index)
    ecc_values = []
    volatile = gpu.find("ecc_errors/volatile")
    if volatile is not None:
        for child in volatile:
            if "uncorrectable" in child.tag:
                ecc_values.append(_int(child.text))
        ecc_values.append(_int(volatile.findtext("double_bit/total")))
    ecc_known = [value for value in ecc_values if value is not None]
    mig_devices = [
        {
            "index": _int(device.findtext("index")),
            "gpu_instance_id": _int(device.findtext("gpu_instance_id")),
            "compute_instance_id": _int(device.findtext("compute_instance_id")),
            "vram_total_bytes": _mib(device.findtext("fb_memory_usage/total"), "MIG memory"),
            "vram_free_bytes": _mib(device.findtext("fb_memory_usage/free"), "MIG memory"),
        }
        for device in gpu.findall("mig_devices/mig_device")
    ]
    return GpuInfo(
        index=index,
        uuid=_xml_text(gpu, "uuid"),
        name=_need(_xml_text(gpu, "product_name"), "product name", f"for GPU {label}"),
        vram_total_bytes=_mib(gpu.findtext("fb_memory_usage/total"), "memory"),
        vram_free_bytes=_mib(gpu.findtext("fb_memory_usage/free"), "memory"),
        compute_capability=None,  # the XML does not carry it
        mig_mode=_mode(gpu.findtext("mig_mode/current_mig")),
        persistence_mode=_mode(gpu.findtext("persistence_mode")),
        ecc_uncorrected=sum(ecc_known) if ecc_known else None,
        mig_devices=mig_devices,
    )


def parse_query_xml(text: str) -> ProbeResult:
    """Read ``nvidia-smi -q -x``."""
    failure = classify_failure(text if not (text or "").lstrip().startswith("<") else "")
    if failure is not None:
        raise failure
    try:
        root = ElementTree.fromstring((text or "").strip())
    except ElementTree.ParseError as error:
        raise NvidiaSmiError(
            f"nvidia-smi XML output is cut off or malformed ({error}): {quote_output(text[-200:])}",
            kind="garbled",
            output=text,
        ) from None
    if root.tag != "nvidia_smi_log":
        raise NvidiaSmiError(f"not nvidia-smi XML: the root element is <{root.tag}>", kind="garbled")
    elements = root.findall("gpu")
    if not elements:
        raise NvidiaSmiError("nvidia-smi XML output lists no GPU", kind="garbled", output=text)
    attached = _int(root.findtext("attached_gpus"))
    if attached is not None and attached < len(elements):
        raise NvidiaSmiError(
            f"nvidia-smi XML says {attached} GPUs are attached but describes {len(elements)}", kind="garbled"
        )
    # Fewer <gpu> elements than attached GPUs is a run with -i, which does not say their indices.
    every_gpu = attached is None or attached == len(elements)
    gpus = [_gpu_from_xml(index if every_gpu else None, gpu) for index, gpu in enumerate(elements)]
    driver = _xml_text(root, "kmd_version") or _xml_text(root, "driver_version")
    cuda = _xml_text(root, "cuda_umd_version") or _xml_text(root, "cuda_version")
    return ProbeResult(
        # nvidia-smi always writes it into the log header: a file without one was edited down by hand.
        driver_version=_need(driver, "driver version", "in its log header", "a trimmed recording"),
        cuda_version=cuda,
        gpus=gpus,
    )


# ---------------------------------------------------------------------------------------------------------
# plain nvidia-smi (the table)

_TABLE_GPU_CELL = re.compile(r"^\s*([0-9]+)\s+(.+?)\s+(\S+)\s*$")
# "59MiB / 81559MiB"; drivers before ~340 print "MB" for the same binary megabytes.
_TABLE_MEMORY = re.compile(r"([0-9]+)\s*Mi?B\s*/\s*([0-9]+)\s*Mi?B")
_TABLE_MIG_ROW = re.compile(r"^\s*([0-9]+)\s+([0-9]+)\s+([0-9]+)\s+([0-9]+)\s*$")
# The line that closes a GPU's box ("+----+----+", "|====+====|" on some drivers).
_TABLE_BORDER = re.compile(r"^\s*[+|][-=+|]*[-=][-=+|]*\s*$")


def _table_memory(cell: str, what: str) -> tuple[int, int] | None:
    """(used, total) bytes from a Memory-Usage cell; None where it prints N/A or Not Supported."""
    memory = _TABLE_MEMORY.search(cell)
    if memory:
        return int(memory.group(1)) * MIB, int(memory.group(2)) * MIB
    # MIG-enabled GPUs on some drivers, unified memory (Grace-Blackwell): "N/A", "Not Supported".
    if all(_value(part) is None for part in re.split(r"\s+/\s+", cell.strip())):  # also "N/A / N/A"
        return None
    raise NvidiaSmiError(
        f"could not read {what} from the nvidia-smi table: {quote_output(cell)} is not 'used / total'",
        kind="garbled",
    )


def parse_table(text: str) -> ProbeResult:
    """Read the plain ``nvidia-smi`` table. Names may be cut ('NVIDIA GeForce ...'); no free VRAM column."""
    failure = classify_failure(text)
    if failure is not None:
        raise failure
    lines = (text or "").splitlines()
    header = next((line for line in lines if "NVIDIA-SMI" in line), None)
    if header is None:
        raise NvidiaSmiError(f"not the nvidia-smi table: {quote_output(text)}", kind="garbled", output=text)
    gpus: list = []
    section, pending, open_box = "gpus", None, None
    for line in lines:
        if "MIG devices:" in line:
            section = "mig"
            continue
        if "Processes:" in line or "processes:" in line:
            break
        if _TABLE_BORDER.match(line):
            open_box, pending = None, None  # the GPU's box is whole
            continue
        cells = line.split("|")
        if len(cells) < 4:
            continue
        if section == "gpus":
            match = _TABLE_GPU_CELL.match(cells[1])
            if match and "." in cells[2]:  # the bus id sits in the second column
                if open_box is not None:
                    break  # a GPU row inside the previous box: the previous box was cut
                pending = {
                    "gpu": GpuInfo(
                        index=int(match.group(1)),
                        uuid=None,
                        name=match.group(2),
                        vram_total_bytes=None,
                        vram_free_bytes=None,
                        persistence_mode=_mode(match.group(3)),
                        ecc_uncorrected=_int(cells[3]),
                    ),
                    "line": 1,
                }
                open_box = pending["gpu"]
                gpus.append(open_box)
            elif pending is not None and pending["line"] == 1:
                memory = _table_memory(cells[2], f"GPU {pending['gpu'].index}'s memory")
                pending["gpu"].vram_total_bytes = memory[1] if memory else None
                pending["line"] = 2
            elif pending is not None and pending["line"] == 2:
                pending["gpu"].mig_mode = _mode(cells[3])
                pending = None
        else:
            match = _TABLE_MIG_ROW.match(cells[1])
            memory = _TABLE_MEMORY.search(cells[2])
            if match and memory:
                owner = next((gpu for gpu in gpus if gpu.index == int(match.group(1))), None)
                if owner is not None:
                    total = int(memory.group(2)) * MIB
                    owner.mig_devices.append(
                        {
                            "index": int(match.group(4)),
                            "gpu_instance_id": int(match.group(2)),
                            "compute_instance_id": int(match.group(3)),
                            "vram_total_bytes": total,
                            "vram_free_bytes": total - int(memory.group(1)) * MIB,
                        }
                    )
    if not gpus:
        raise NvidiaSmiError(f"the nvidia-smi table lists no GPU: {quote_output(header)}", kind="garbled")
    if open_box is not None:
        raise NvidiaSmiError(
            f"the nvidia-smi table is cut off: the box of GPU {open_box.index} ({open_box.name}) has no "
            "closing border",
            kind="garbled",
        )
    return ProbeResult(
        driver_version=_need(
            parse_driver_version(header),
            "driver version",
            "in the table header",
            "nvidia-smi prints it always",
        ),
        cuda_version=parse_cuda_version(header),
        gpus=gpus,
    )


# ---------------------------------------------------------------------------------------------------------
# Recorded output of unknown shape


def _capture_sections(text: str) -> list:
    """[(command, body)] of a capture made of '####' banners with '# $ <command>' lines."""
    sections, command, body, in_banner = [], None, [], False
    for line in text.splitlines():
        if _CAPTURE_BANNER.match(line):
            if not in_banner and command is not None:
                sections.append((command, "\n".join(body)))
                command, body = None, []
            in_banner = not in_banner
            continue
        if in_banner:
            if line.startswith("# $ "):
                command = line[4:].strip()
            continue
        body.append(line)
    if command is not None:
        sections.append((command, "\n".join(body)))
    return sections


def parse_capture(text: str) -> ProbeResult:
    """Read a capture holding several nvidia-smi runs: GPUs from its first --query-gpu, CUDA from -q."""
    sections = _capture_sections(text)
    by_command: dict = {}
    for command, body in sections:
        key = "query-gpu" if command.startswith("nvidia-smi --query-gpu=") else command
        by_command.setdefault(key, body)
    if "query-gpu" in by_command:
        result = parse_query_csv(by_command["query-gpu"])
    elif "nvidia-smi -q" in by_command:
        result = parse_query_text(by_command["nvidia-smi -q"])
    else:
        raise NvidiaSmiError("the capture has no --query-gpu or -q section", kind="garbled")
    for command in ("nvidia-smi -q", "nvidia-smi", "nvidia-smi --version"):
        if result.cuda_version is None and command in by_command:
            result.cuda_version = parse_cuda_version(by_command[command])
    return result


def parse_recorded(text: str) -> ProbeResult:
    """Read recorded nvidia-smi output of any supported shape (XML, -q, table, CSV, capture)."""
    stripped = (text or "").lstrip()
    head = stripped[:400]
    if stripped.startswith("<"):
        return parse_query_xml(text)
    if "nvidia_gpu_exporter GPU capture" in head or _capture_sections(text[:2000]):
        return parse_capture(text)
    if "NVSMI LOG" in head:
        return parse_query_text(text)
    if "List of valid properties to query" in head:
        raise NvidiaSmiError(
            "this is nvidia-smi --help-query-gpu text (the field list), not a GPU recording", kind="garbled"
        )
    if "NVIDIA-SMI" in head and "|" in head:
        return parse_table(text)
    failure = classify_failure(text)
    if failure is not None:
        raise failure
    if "," in head:
        return parse_query_csv(text)
    raise NvidiaSmiError(f"unrecognised nvidia-smi output: {quote_output(text)}", kind="garbled", output=text)


# ---------------------------------------------------------------------------------------------------------
# The probe


def probe(
    nvidia_smi: str = "nvidia-smi",
    timeout: float = 10.0,
    fields: tuple = QUERY_FIELDS,
    runner: Callable[..., str] | None = None,
    with_cuda: bool = True,
) -> ProbeResult:
    """Ask nvidia-smi about every GPU and (unless with_cuda is False) the CUDA version.

    Raises NvidiaSmiError on any failure. `runner(args, nvidia_smi, timeout) -> stdout` replaces
    run_nvidia_smi, e.g. to run it through another transport.
    """
    run = runner or run_nvidia_smi
    asked = list(fields)
    while True:
        try:
            output = run(
                ["--query-gpu=" + ",".join(asked), "--format=csv,noheader,nounits"], nvidia_smi, timeout
            )
            break
        except NvidiaSmiError as error:
            rejected = error.field_name
            if error.kind != "unsupported-field" or rejected not in asked or rejected in REQUIRED_FIELDS:
                raise
            asked.remove(rejected)  # an older driver: ask again without the optional field
    result = parse_query_csv(output, fields=asked)
    # Asked for, so printed: the probe's answer always has the driver version and every GPU's index.
    _need(result.driver_version, "driver version", "for GPU 0", "it was asked for")
    if not with_cuda:
        return result
    try:
        result.cuda_version = parse_cuda_version(run([], nvidia_smi, timeout))
        if result.cuda_version is None:
            result.cuda_version = parse_cuda_version(run(["-q"], nvidia_smi, timeout))
    except NvidiaSmiError as error:
        if error.kind == "timeout":
            raise
        result.cuda_version = None  # the GPU list stands; the CUDA version stays unknown
    return result
