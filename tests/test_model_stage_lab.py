"""The lab's model mirror generates exactly the file the lab inventory lists: the tiny real GGUF."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import yaml
from support import REPO_ROOT

MODELS_YML = REPO_ROOT / "inventories" / "lab" / "group_vars" / "gpu_nodes" / "models.yml"
POOLS_YML = REPO_ROOT / "inventories" / "lab" / "group_vars" / "gpu_nodes" / "main.yml"
MAKE_GGUF = REPO_ROOT / "lab" / "model_mirror" / "make_gguf.py"
BUILD_ENGINE = REPO_ROOT / "scripts" / "build-engine.sh"


def test_generated_lab_model_matches_the_listed_sha256_and_size(tmp_path):
    listed = yaml.safe_load(MODELS_YML.read_text())["model_staging_models"]
    assert listed, "the lab lists at least one model"
    # The vocab comes from the engine's cached source (fetched once, never built here).
    vocab = subprocess.run(
        ["bash", str(BUILD_ENGINE), "--vocab"], check=True, capture_output=True, text=True, timeout=600
    ).stdout.strip()
    for model in listed:
        assert model["source"].endswith(".gguf"), model["id"]
        assert ":9280/" in model["source"]  # served by lab/model_mirror.yml
        target = tmp_path / model["source"].rsplit("/", 1)[-1]
        command = [sys.executable, str(MAKE_GGUF), "--vocab", vocab, str(target)]
        subprocess.run(command, check=True, timeout=120)
        data = target.read_bytes()
        assert len(data) == model["size_bytes"]
        assert hashlib.sha256(data).hexdigest() == model["sha256"], model["id"]


def test_every_lab_engine_serves_a_model_the_lab_stages():
    staged = {model["id"] for model in yaml.safe_load(MODELS_YML.read_text())["model_staging_models"]}
    pools = yaml.safe_load(POOLS_YML.read_text())["pool_managerd_pools"]
    engines = [pool["engine"] for pool in pools if "engine" in pool]
    assert engines, "each lab node runs at least one engine"
    assert {engine["model"] for engine in engines} <= staged
