"""What this node is (registration) and how its pools stand (heartbeat), built from the probe and config."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import msgspec

from . import __version__
from .config import ConfigError, PoolConfig, Settings, machine_id, ram_total_bytes
from .engine_config import EngineFile
from .engine_watch import EngineReading
from .nvidia_smi import NvidiaSmiError, ProbeResult, probe
from .wire import Capabilities, GpuInfo, Heartbeat, PoolSpec, PoolStatus, Registration

# Failures that mean "this host has no GPU" rather than "its GPU or driver is broken".
NO_GPU_KINDS = ("not-found", "no-devices")
# The daemon requires a compute capability, a name and a driver version; drivers before ~510 cannot tell
# the compute capability, and the parser reports any field the driver did not print as missing.
UNKNOWN = "unknown"
# The start-up probe: nvidia-smi on a large node with persistence mode off can take seconds; past this it is
# hung. Nothing waits on it but the start. At runtime the probe gives up after gpu_probe_timeout_s.
NVIDIA_SMI_START_TIMEOUT_S = 30.0


def probe_gpus(
    settings: Settings, with_cuda: bool = True, timeout: float = NVIDIA_SMI_START_TIMEOUT_S
) -> ProbeResult | None:
    """The node's GPUs, or None for a host without GPUs when CPU pools are allowed."""
    try:
        return probe(settings.nvidia_smi, timeout=timeout, with_cuda=with_cuda)
    except NvidiaSmiError as error:
        if settings.allow_cpu_pools and error.kind in NO_GPU_KINDS:
            return None
        raise


def resolve_pools(settings: Settings, gpus: ProbeResult | None) -> tuple[PoolConfig, ...]:
    """The configured pools, checked against the GPUs found; by default one pool with every GPU."""
    indices = [gpu.index for gpu in gpus.gpus] if gpus else []
    if settings.pools is None:
        return (PoolConfig("default" if indices else "cpu", tuple(indices), 1),)
    for number, pool in enumerate(settings.pools):
        for index in pool.gpus:
            if index not in indices:
                found = ", ".join(str(i) for i in indices) if indices else "none"
                raise ConfigError(
                    f"pools[{number}] ({pool.pool_id}) names GPU {index}, but this node's GPUs are: {found}"
                )
    return settings.pools


def with_engine_slots(
    pools: tuple[PoolConfig, ...], engines: dict[str, EngineFile]
) -> tuple[PoolConfig, ...]:
    """The pools, each pool with an engine holding the engine's parallel slots (its slots_total)."""
    return tuple(
        msgspec.structs.replace(pool, slots_total=engines[pool.pool_id].parallel)
        if pool.pool_id in engines
        else pool
        for pool in pools
    )


def registration(settings: Settings, gpus: ProbeResult | None, pools: tuple[PoolConfig, ...]) -> Registration:
    """The POST /v2/nodes/register body, as the contract's struct."""
    driver_version = (gpus.driver_version if gpus else None) or UNKNOWN
    gpu_list = [
        GpuInfo(
            index=gpu.index,
            # The parser reports a field the driver did not print as None; the daemon needs a value. A MIG GPU
            # that prints no total of its own holds what its MIG devices hold.
            name=gpu.name or UNKNOWN,
            vram_total_bytes=gpu.known_vram_total_bytes() or 0,
            compute_capability=gpu.compute_capability or UNKNOWN,
            driver_version=driver_version,
            uuid=gpu.uuid or None,
        )
        for gpu in (gpus.gpus if gpus else [])
    ]
    return Registration(
        node_id=settings.node_id,
        address=settings.address,
        version=__version__,
        pools=[PoolSpec(pool_id=p.pool_id, gpus=list(p.gpus), slots_total=p.slots_total) for p in pools],
        capabilities=Capabilities(
            gpus=gpu_list,
            cpu_cores=os.cpu_count() or 1,
            ram_total_bytes=ram_total_bytes(),
            cuda_version=(gpus.cuda_version if gpus else None) or None,
        ),
        machine_id=machine_id(),
    )


def pool_statuses(
    pools: tuple[PoolConfig, ...],
    gpus: ProbeResult | None,
    gpus_healthy: bool,
    draining: bool,
    models: list[str],
    engines: dict[str, EngineReading] | None = None,
) -> list[PoolStatus]:
    """One heartbeat entry per pool.

    slots_free counts slots with no request in flight, draining or not: a drain stops new placements (the
    `draining` flag), and free == total is how the rolling upgrade sees that a draining node has gone idle.
    A pool with an engine is ready only while its GPUs are and its engine serves (ready or busy); its
    slots are the engine's (every one free while it does not serve: nothing is in flight). A pool without
    one is ready by its GPUs alone and serves nothing, every slot free.
    """
    engines = engines or {}
    by_index = {gpu.index: gpu for gpu in gpus.gpus} if gpus else {}
    statuses = []
    for pool in pools:
        members = [by_index[index] for index in pool.gpus if index in by_index]
        ready = len(members) == len(pool.gpus) and (gpus_healthy or not pool.gpus)
        total = sum(gpu.known_vram_total_bytes() or 0 for gpu in members)
        engine = engines.get(pool.pool_id)
        statuses.append(
            PoolStatus(
                pool_id=pool.pool_id,
                ready=ready and (engine is None or engine.serving),
                draining=draining,
                slots_total=engine.slots_total if engine else pool.slots_total,
                slots_free=engine.slots_free if engine else pool.slots_total,
                vram_total_bytes=total,
                # Never above the total, which the daemon refuses (a driver printing free > total).
                vram_free_bytes=min(total, sum(gpu.vram_free_bytes or 0 for gpu in members)),
                engine=engine.status if engine else None,
                models_available=list(models),
            )
        )
    return statuses


def heartbeat(statuses: list[PoolStatus]) -> Heartbeat:
    return Heartbeat(timestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), pools=statuses)
