"""Start the daemon and the bare app pinned to one core, seed nodes over HTTP, drive them with wrk."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import re
import secrets
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import aiohttp

REPO_ROOT = Path(__file__).resolve().parents[2]
DAEMON_SOURCE = REPO_ROOT / "files" / "orchestratord"
BARE_APP = Path(__file__).resolve().parent / "bare_app.py"
SERVER_CPU, LOAD_CPU = "0", "1"


@dataclass
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int
    server_cpu_us_per_request: float  # CPU time the server process spent per answered request


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_tools() -> None:
    if os.cpu_count() is None or os.cpu_count() < 2:
        sys.exit("the benchmark pins the server and the load generator to separate cores: it needs 2 CPUs")
    if shutil.which("taskset") is None:
        sys.exit("taskset (util-linux) is missing")
    if shutil.which("wrk") is None:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            print("wrk is missing: installing it with apt-get", flush=True)
            subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True, stdout=subprocess.DEVNULL)
        else:
            sys.exit("wrk is missing: install it (apt-get install wrk) and run again")


def wait_healthy(
    url: str, proc: subprocess.Popen, timeout: float = 30, context: ssl.SSLContext | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1, context=context) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"server did not answer {url}/health within {timeout}s")


class Daemon:
    """orchestratord as shipped (metrics on, SQLite WAL with synchronous=FULL), pinned to SERVER_CPU.

    With `ca_file` (and tls_cert_file, tls_key_file among the settings) it serves HTTPS, as deployed."""

    def __init__(self, workdir: Path, db_dir: Path, ca_file: Path | None = None, **settings) -> None:
        self.token = secrets.token_urlsafe(32)
        self.port = free_port()
        self.client_context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
        self.url = f"{'https' if ca_file else 'http'}://127.0.0.1:{self.port}"
        token_file = workdir / "api-token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        config = {
            "listen_host": "127.0.0.1",
            "listen_port": self.port,
            "token_file": str(token_file),
            "db_path": str(db_dir / "registry.db"),
            "log_level": "warning",
            # The benches measure the daemon's own work; one that measures TLS passes its files instead.
            "plain_http": ca_file is None,
            **settings,
        }
        config_path = workdir / "orchestratord.yml"
        config_path.write_text(json.dumps(config))
        # The source tree first, then whatever path the bench itself runs with (its packages may live there).
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(filter(None, [str(DAEMON_SOURCE), os.environ.get("PYTHONPATH")])),
        )
        env.pop("LLORCH_API_TOKEN", None)
        self.log = (workdir / "orchestratord.log").open("wb")
        self.proc = subprocess.Popen(
            [
                "taskset",
                "-c",
                SERVER_CPU,
                sys.executable,
                "-m",
                "orchestratord",
                "--config",
                str(config_path),
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_healthy(self.url, self.proc, context=self.client_context)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


class BareApp:
    """The floor: bare_app.py pinned like the daemon; with `tls` (ca, cert, key) behind the daemon's TLS."""

    def __init__(self, mode: str, tls: tuple[Path, Path, Path] | None = None) -> None:
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        tls_args = ["--cert", str(tls[1]), "--key", str(tls[2])] if tls else []
        self.proc = subprocess.Popen(
            [
                "taskset",
                "-c",
                SERVER_CPU,
                sys.executable,
                str(BARE_APP),
                "--mode",
                mode,
                "--port",
                str(self.port),
                *tls_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        context = ssl.create_default_context(cafile=str(tls[0])) if tls else None
        wait_healthy(self.url, self.proc, context=context)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def registration(node_id: str, pools: int) -> dict:
    return {
        "node_id": node_id,
        "machine_id": f"machine-{node_id}",
        "address": f"http://{node_id}.bench:8080",
        "version": "bench",
        "pools": [{"pool_id": f"pool-{p}", "gpus": [p], "slots_total": 8} for p in range(pools)],
        "capabilities": {
            "gpus": [
                {
                    "index": p,
                    "uuid": f"GPU-{node_id}-{p}",
                    "name": "NVIDIA H100 80GB HBM3",
                    "vram_total_bytes": 80 * 1024**3,
                    "compute_capability": "9.0",
                    "driver_version": "550.90.07",
                }
                for p in range(pools)
            ],
            "cuda_version": "12.4",
            "cpu_cores": 64,
            "ram_total_bytes": 512 * 1024**3,
        },
    }


def pool_status(
    pool_id: str,
    slots_free: int,
    vram_free_gib: int,
    models: list[str],
    vram_total_gib: int = 80,
    serves: str | None = None,
) -> dict:
    """A pool reading whose engine is ready and serves `serves` (default: the first of `models`)."""
    served = serves if serves is not None else (models[0] if models else None)
    engine = None
    if served is not None:
        engine = {"kind": "llama.cpp", "state": "ready", "model_id": served, "url": "http://10.0.0.1:8101"}
    return {
        "pool_id": pool_id,
        "ready": True,
        "draining": False,
        "slots_total": 8,
        "slots_free": slots_free,
        "vram_total_bytes": vram_total_gib * 1024**3,
        "vram_free_bytes": vram_free_gib * 1024**3,
        "engine": engine,
        "models_available": models,
    }


def heartbeat_body(pools: list[dict]) -> dict:
    return {"timestamp": "2026-01-01T00:00:00Z", "pools": pools}


async def _seed(url: str, token: str, nodes: list[tuple[dict, dict]], concurrency: int) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    limit = asyncio.Semaphore(concurrency)

    async def one(session: aiohttp.ClientSession, reg: dict, beat: dict) -> None:
        async with limit:
            async with session.post(url + "/v2/nodes/register", json=reg, headers=headers) as answer:
                if answer.status != 200:
                    raise RuntimeError(f"register {reg['node_id']}: {answer.status} {await answer.text()}")
            hb_url = f"{url}/v2/nodes/{reg['node_id']}/heartbeat"
            async with session.post(hb_url, json=beat, headers=headers) as answer:
                if answer.status != 200:
                    raise RuntimeError(f"heartbeat {reg['node_id']}: {answer.status} {await answer.text()}")

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session, reg, beat) for reg, beat in nodes))


def seed_nodes(url: str, token: str, nodes: list[tuple[dict, dict]], concurrency: int = 32) -> float:
    """Register each node and send its first heartbeat over HTTP; returns the seconds it took."""
    started = time.perf_counter()
    asyncio.run(_seed(url, token, nodes, concurrency))
    return time.perf_counter() - started


def online_count(url: str, token: str, context: ssl.SSLContext | None = None) -> int:
    request = urllib.request.Request(
        url + "/v2/nodes?status=online", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=60, context=context) as answer:
        return json.load(answer)["count"]


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * _UNITS[unit]


class BenchFailed(SystemExit):
    """A round whose answers were not all 2xx: its figures would measure error paths, not the work."""


def start_wrk(url: str, script: Path, duration_s: int, connections: int) -> subprocess.Popen:
    """wrk (one thread) pinned to the load CPU, in the background; finish_wrk collects it."""
    command = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency"]
    return subprocess.Popen(
        [*command, "-s", str(script), url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish_wrk(proc: subprocess.Popen, duration_s: int, label: str) -> WrkResult:
    """The result of a wrk from start_wrk (server CPU left at 0: the caller knows which server it loaded).

    Fails the bench (BenchFailed) when any answer was not 2xx or any socket failed: wrk counts a 4xx or
    5xx as a request served, so a daemon refusing every request would otherwise print a fine ratio.
    """
    try:
        output, errors = proc.communicate(timeout=duration_s + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise BenchFailed(f"bench: {label}: wrk did not finish within {duration_s + 60} s") from None
    if proc.returncode != 0:
        raise BenchFailed(f"bench: {label}: wrk exited with {proc.returncode}: {errors.strip()[:500]}")
    result = parse_wrk(output)
    if result.non_2xx or result.socket_errors:
        raise BenchFailed(
            f"bench: {label}: {result.non_2xx} of {result.requests} answers were not 2xx, "
            f"{result.socket_errors} socket errors; a failed round prints no figure"
        )
    return result


def run_wrk(
    url: str, script: Path, duration_s: int, connections: int, server_pid: int, label: str = "wrk"
) -> WrkResult:
    """One wrk run against one server; its result carries the server's CPU time per answered request."""
    cpu_before = process_cpu_s(server_pid)
    result = finish_wrk(start_wrk(url, script, duration_s, connections), duration_s, label)
    cpu_s = process_cpu_s(server_pid) - cpu_before
    return dataclasses.replace(result, server_cpu_us_per_request=cpu_s / max(result.requests, 1) * 1e6)


def parse_wrk(output: str) -> WrkResult:
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", output, re.MULTILINE))
    # wrk counts answers with a status of 400 and above here; the daemon never redirects.
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return WrkResult(
        requests_per_s=float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
        p50_ms=_ms(percentiles["50"]),
        p99_ms=_ms(percentiles["99"]),
        requests=int(re.search(r"(\d+) requests in", output).group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
        server_cpu_us_per_request=0.0,
    )


def lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal for ASCII text


def median_result(results: list[WrkResult]) -> WrkResult:
    return WrkResult(
        requests_per_s=statistics.median(r.requests_per_s for r in results),
        p50_ms=statistics.median(r.p50_ms for r in results),
        p99_ms=statistics.median(r.p99_ms for r in results),
        requests=sum(r.requests for r in results),
        non_2xx=sum(r.non_2xx for r in results),
        socket_errors=sum(r.socket_errors for r in results),
        server_cpu_us_per_request=statistics.median(r.server_cpu_us_per_request for r in results),
    )


def describe(name: str, result: WrkResult) -> str:
    return (
        f"{name:<28} {result.requests_per_s:>9.0f} req/s   p50 {result.p50_ms:6.2f} ms   "
        f"p99 {result.p99_ms:6.2f} ms   server CPU {result.server_cpu_us_per_request:5.0f} us/req   "
        f"non-2xx {result.non_2xx}   socket errors {result.socket_errors}"
    )


def scratch_dir(prefix: str, memory: bool = False) -> tempfile.TemporaryDirectory:
    """A temp dir on disk, or in /dev/shm when `memory` (for seeding many nodes quickly)."""
    base = "/dev/shm" if memory and Path("/dev/shm").is_dir() else None
    return tempfile.TemporaryDirectory(prefix=prefix, dir=base)


def machine_note() -> str:
    load = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start"


def rng(seed: int = 42) -> random.Random:
    return random.Random(seed)


@dataclass
class Target:
    """One server a bench loads in turn with the others: what it is called, where, its process, its script."""

    label: str
    url: str
    pid: int
    script: Path


def alternating_rounds(
    targets: list[Target], rounds: int, duration_s: int, connections: int, note: str = ""
) -> list[list[WrkResult]]:
    """A 2 s warm-up of each target, then `rounds` rounds of each in turn, each round printed; the results
    per target, in the order of `targets`. Every other round runs the targets in reverse order, so a
    machine growing busier or quieter during the run does not favour whichever always runs first."""
    for target in targets:
        run_wrk(target.url, target.script, 2, connections, target.pid, f"warm-up, {target.label}")
    results: list[list[WrkResult]] = [[] for _ in targets]
    for number in range(1, rounds + 1):
        order = list(enumerate(targets))
        for index, target in order if number % 2 else reversed(order):
            label = f"round {number}, {target.label}{note}"
            results[index].append(
                run_wrk(target.url, target.script, duration_s, connections, target.pid, label)
            )
        print(f"round {number}:")
        for target, runs in zip(targets, results, strict=True):
            print("  " + describe(target.label, runs[-1]))
    return results


def paired_rounds(
    daemon: Daemon,
    daemon_script: Path,
    bare: BareApp,
    bare_script: Path,
    rounds: int,
    duration_s: int,
    connections: int,
    note: str = "",
) -> tuple[list[WrkResult], list[WrkResult]]:
    """The daemon and the bare app in alternating rounds (see alternating_rounds)."""
    daemon_runs, bare_runs = alternating_rounds(
        [
            Target("orchestratord", daemon.url, daemon.proc.pid, daemon_script),
            Target("bare aiohttp", bare.url, bare.proc.pid, bare_script),
        ],
        rounds,
        duration_s,
        connections,
        note,
    )
    return daemon_runs, bare_runs
