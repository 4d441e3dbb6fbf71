"""The lab's model mirror generates exactly the file the lab inventory lists."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import yaml
from support import REPO_ROOT

MODELS_YML = REPO_ROOT / "inventories" / "lab" / "group_vars" / "gpu_nodes" / "models.yml"
GENERATOR = REPO_ROOT / "lab" / "model_mirror" / "make_model.py"


def test_generated_lab_model_matches_the_listed_sha256_and_size(tmp_path):
    listed = yaml.safe_load(MODELS_YML.read_text())["model_staging_models"]
    assert listed, "the lab lists at least one model"
    for model in listed:
        target = tmp_path / model["source"].rsplit("/", 1)[-1]
        subprocess.run([sys.executable, str(GENERATOR), str(target), str(model["size_bytes"])], check=True)
        data = target.read_bytes()
        assert len(data) == model["size_bytes"]
        assert hashlib.sha256(data).hexdigest() == model["sha256"], model["id"]
        assert ":9280/" in model["source"]  # served by lab/model_mirror.yml
