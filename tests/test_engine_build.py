"""scripts/build-engine.sh: llama-server built once, cached by content outside the clone, one archive."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import tarfile
import time

import pytest
from support import REPO_ROOT
from support_engine import BUILD_SCRIPT, BUILD_TIMEOUT_S, build_script, engine_archive, unpack_engine

# What a node must already have: the C and C++ runtimes of every Debian (apt itself needs libstdc++).
SYSTEM_LIBRARIES = {
    "linux-vdso.so.1",
    "ld-linux-x86-64.so.2",
    "libc.so.6",
    "libm.so.6",
    "libstdc++.so.6",
    "libgcc_s.so.1",
}
SDIST_SHA256 = re.search(r"SDIST_SHA256=([0-9a-f]{64})", BUILD_SCRIPT.read_text()).group(1)

# The first test may build llama-server (minutes, once per machine) before it starts its clock.
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_S)


@pytest.fixture(scope="module")
def archive():
    return engine_archive()


def test_a_second_call_finds_the_cached_archive_in_well_under_a_second(archive):
    started = time.monotonic()
    answer = build_script()
    elapsed = time.monotonic() - started
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() == str(archive)
    assert answer.stderr == ""
    assert elapsed < 0.5


def test_the_archive_lives_outside_the_clone_under_its_key(archive):
    key = build_script("--key").stdout.strip()
    assert archive.parent.name == key
    assert archive.name == "llama-server.tar.gz"
    assert not archive.resolve().is_relative_to(REPO_ROOT.resolve())


def test_the_key_names_the_flavor_and_changes_with_the_flags():
    cpu = build_script("--key").stdout.strip()
    cuda = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--key"],
        env={**os.environ, "LLORCH_ENGINE_CUDA": "1"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert re.fullmatch(r"llama-server-[0-9.]+-cpu-[0-9a-f]{16}", cpu)
    assert re.fullmatch(r"llama-server-[0-9.]+-cuda-[0-9a-f]{16}", cuda)
    assert cpu.rsplit("-", 1)[1] != cuda.rsplit("-", 1)[1]
    assert build_script("--key").stdout.strip() == cpu


def test_the_archive_holds_plain_files_only_and_its_digest_beside_it(archive):
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
    assert all(member.isfile() or member.isdir() for member in members)
    names = {member.name for member in members}
    assert {"llama-server/llama-server", "llama-server/BUILD-INFO"} <= names
    assert any(name.startswith("llama-server/libllama") for name in names)
    assert all(name.startswith("llama-server/") or name == "llama-server" for name in names)
    recorded = (archive.parent / "llama-server.tar.gz.sha256").read_text().split()[0]
    assert recorded == hashlib.sha256(archive.read_bytes()).hexdigest()


def test_the_unpacked_binary_runs_with_only_the_libraries_beside_it(archive, tmp_path):
    binary = unpack_engine(archive, tmp_path)
    assert stat.S_IMODE(binary.stat().st_mode) == 0o755
    dynamic = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True, check=True)
    assert "[$ORIGIN]" in dynamic.stdout
    libraries = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    assert "not found" not in libraries
    assert f"{binary.parent}/libllama" in libraries
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, env={}, timeout=30)
    assert version.returncode == 0, version.stderr
    assert re.search(r"^version: \d+", version.stderr + version.stdout, re.MULTILINE)
    build_info = (binary.parent / "BUILD-INFO").read_text()
    assert SDIST_SHA256 in build_info
    assert "-DGGML_NATIVE=OFF" in build_info


def test_the_engine_needs_nothing_from_the_node_but_the_c_and_cxx_runtimes(archive, tmp_path):
    folder = unpack_engine(archive, tmp_path).parent
    for elf in sorted(path for path in folder.iterdir() if path.name != "BUILD-INFO"):
        resolved = subprocess.run(["ldd", str(elf)], capture_output=True, text=True, check=True).stdout
        for line in resolved.splitlines():
            name, _, location = line.strip().partition(" => ")
            location = location.split(" (")[0]
            library = os.path.basename(name.split(" (")[0])
            assert location.startswith(f"{folder}/") or library in SYSTEM_LIBRARIES, f"{elf.name}: {line}"


def test_a_corrupt_cached_sdist_is_never_used(tmp_path):
    # A cache folder with a tampered sdist and a pip that cannot fetch: the script must refuse, not build.
    sdist_dir = tmp_path / "sdist"
    sdist_dir.mkdir()
    name = re.search(r"SDIST_NAME=(\S+)", BUILD_SCRIPT.read_text()).group(1)
    version = re.search(r"SDIST_VERSION=(\S+)", BUILD_SCRIPT.read_text()).group(1)
    (sdist_dir / name.replace("${SDIST_VERSION}", version)).write_bytes(b"not the sdist")
    answer = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--vocab"],
        env={**os.environ, "LLORCH_ENGINE_CACHE": str(tmp_path), "LLORCH_PIP": "false"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert answer.returncode == 1
    assert (
        answer.stderr.strip()
        .splitlines()[-1]
        .startswith("build-engine: pip could not fetch llama-cpp-python==")
    )
    assert not list(tmp_path.glob("vocab-*/*.gguf"))


def test_an_unknown_argument_is_refused_in_one_line():
    answer = build_script("--frobnicate")
    assert answer.returncode == 1
    assert (
        answer.stderr.strip()
        == "build-engine: unknown argument: --frobnicate (usage: build-engine.sh [--key | --vocab])"
    )
