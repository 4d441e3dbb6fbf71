"""`python -m pool_managerd.engine_exec FILE` launches the real llama-server for a pool, or refuses a setup a
person must fix with exit 2 and one line naming the pool and the cause (the unit does not restart then)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import wait_until
from support_engine import (
    BUILD_TIMEOUT_S,
    ENGINE_API_KEY,
    TINY_MODEL_ID,
    EngineUnit,
    engine_archive,
    engine_settings,
    engine_unit,
    make_tiny_model,
    stage_model,
    unpack_engine,
)

pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_S)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(llama-server binary, the tiny model): unpacked and made once for the module."""
    workdir = tmp_path_factory.mktemp("built")
    return unpack_engine(engine_archive(), workdir), make_tiny_model(workdir / "tiny.gguf")


@pytest.fixture
def unit(built, tmp_path) -> Iterator[EngineUnit]:
    binary, model = built
    models_dir = tmp_path / "models"
    stage_model(models_dir, TINY_MODEL_ID, model)
    made = engine_unit(tmp_path / "engine", engine_settings("p0", binary, models_dir))
    yield made
    made.stop()


def refused(unit: EngineUnit, **env: str) -> str:
    """Run engine_exec to its end; assert exit 2 and one line naming the pool; return that line."""
    answer = subprocess.run(
        unit.command(), capture_output=True, text=True, timeout=60, env={**unit.env(), **env}, check=False
    )
    assert answer.returncode == 2, (answer.returncode, answer.stderr)
    lines = answer.stderr.splitlines()
    assert len(lines) == 1, answer.stderr
    assert "Traceback" not in answer.stderr
    return lines[0]


def rewrite(unit: EngineUnit, **changes) -> None:
    unit.engine_file.write_text(json.dumps({**unit.settings, **changes}))


def manifest_of(unit: EngineUnit) -> tuple[Path, dict]:
    path = Path(unit.settings["models_dir"]) / "manifest.json"
    return path, json.loads(path.read_text())


def test_a_good_engine_file_execs_llama_server_which_answers_health(unit):
    unit.start()
    pid = unit.process.pid
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert Path(cmdline[0].decode()).name == "llama-server", "engine_exec replaced itself with the engine"
    assert cmdline[cmdline.index(b"--api-key-file") + 1].decode().startswith(str(unit.credentials_dir))
    assert b"--no-webui" in cmdline and b"--metrics" in cmdline
    assert ENGINE_API_KEY.encode() not in b"\0".join(cmdline)
    environ = dict(
        item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if item
    )
    assert environ[b"CUDA_VISIBLE_DEVICES"] == b"0"
    assert ENGINE_API_KEY.encode() not in b"\0".join(environ.values())
    assert unit.api("GET", "/health", key=None).body == {"status": "ok"}
    models = unit.api("GET", "/v1/models").body
    assert [model["id"] for model in models["data"]] == [TINY_MODEL_ID], "served under the model id"
    slots = unit.api("GET", "/slots").body
    assert len(slots) == unit.settings["parallel"]
    assert "starting llama.cpp for model 'llorch-lab/tiny'" in unit.log_tail(50)


def test_the_engine_gets_no_llama_setting_from_the_environment(unit):
    # llama-server reads LLAMA_ARG_ENDPOINT_SLOTS=0 as --no-slots, which would blind the agent: the engine
    # file is the one home of the engine's settings.
    with open(unit.log_path, "ab") as log:
        unit.process = subprocess.Popen(
            unit.command(), stdout=log, stderr=subprocess.STDOUT, env=unit.env(LLAMA_ARG_ENDPOINT_SLOTS="0")
        )
    wait_until(unit.healthy, timeout=60, interval=0.02, what="engine /health")
    assert unit.api("GET", "/slots").status == 200
    environ = Path(f"/proc/{unit.process.pid}/environ").read_bytes()
    assert b"LLAMA_ARG_ENDPOINT_SLOTS" not in environ


def test_a_cpu_pool_gets_no_gpu(unit):
    rewrite(unit, gpus=[])
    unit.start()
    environ = Path(f"/proc/{unit.process.pid}/environ").read_bytes().split(b"\0")
    assert b"CUDA_VISIBLE_DEVICES=" in environ


def test_a_model_not_staged_is_refused(unit):
    rewrite(unit, model_id="llorch-lab/other")
    line = refused(unit)
    assert line.startswith("llorch-engine: pool p0: model 'llorch-lab/other' is not staged on this node")


def test_a_model_without_a_checksum_is_not_verified(unit):
    path, manifest = manifest_of(unit)
    del manifest[TINY_MODEL_ID]["sha256"]
    path.write_text(json.dumps(manifest))
    assert "without a sha256: not verified" in refused(unit)


def test_a_model_file_changed_since_staging_is_refused(unit):
    _path, manifest = manifest_of(unit)
    with open(manifest[TINY_MODEL_ID]["path"], "ab") as model:
        model.write(b"\0")
    assert "changed since it was staged and verified" in refused(unit)


def test_a_model_file_missing_is_refused(unit):
    _path, manifest = manifest_of(unit)
    os.unlink(manifest[TINY_MODEL_ID]["path"])
    assert "is missing; stage it again" in refused(unit)


def test_a_model_file_replaced_by_a_link_is_refused(unit, tmp_path):
    _path, manifest = manifest_of(unit)
    model = Path(manifest[TINY_MODEL_ID]["path"])
    moved = tmp_path / "elsewhere.gguf"
    os.replace(model, moved)
    model.symlink_to(moved)
    assert "refused (a symbolic link)" in refused(unit)


def test_a_model_outside_models_dir_is_refused(unit, tmp_path):
    path, manifest = manifest_of(unit)
    manifest[TINY_MODEL_ID]["path"] = str(tmp_path / "tiny.gguf")
    path.write_text(json.dumps(manifest))
    assert "is not directly inside models_dir" in refused(unit)


def test_a_missing_binary_is_refused(unit, tmp_path):
    rewrite(unit, binary=str(tmp_path / "nowhere" / "llama-server"))
    assert refused(unit).endswith("llama-server is missing")


def test_a_binary_that_is_not_executable_is_refused(unit, tmp_path):
    copy = tmp_path / "llama-server"
    copy.write_bytes(b"\x7fELF")
    copy.chmod(0o644)
    rewrite(unit, binary=str(copy))
    assert refused(unit).endswith("is not an executable file")


def test_no_credentials_directory_is_refused(unit):
    env = unit.env()
    del env["CREDENTIALS_DIRECTORY"]
    answer = subprocess.run(unit.command(), capture_output=True, text=True, timeout=60, env=env, check=False)
    assert answer.returncode == 2
    assert answer.stderr.strip() == (
        "llorch-engine: pool p0: no engine API key: $CREDENTIALS_DIRECTORY is unset (the unit needs "
        "LoadCredential=engine-api-key:/etc/pool-managerd/engine-api-key)"
    )


def test_a_missing_key_file_is_refused(unit):
    (unit.credentials_dir / "engine-api-key").unlink()
    line = refused(unit)
    assert line.endswith("engine-api-key not found") and line.startswith(
        "llorch-engine: pool p0: engine API key"
    )


def test_a_bad_engine_file_is_refused(unit):
    rewrite(unit, port=0)
    assert refused(unit) == (
        f"llorch-engine: pool p0: engine file {unit.engine_file}: "
        "'port' must be a port from 1 to 65535, not 0"
    )


def test_a_missing_engine_file_is_refused(unit):
    unit.engine_file.unlink()
    assert refused(unit) == f"llorch-engine: pool p0: engine file {unit.engine_file} not found"
