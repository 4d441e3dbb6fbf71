"""The wheelhouse role through `ansible-playbook` on this machine, with a tiny package of its own."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile

import pytest
from support import REPO_ROOT
from support_roles import failures, run_playbook

DIGEST = REPO_ROOT / "roles" / "wheelhouse" / "files" / "wheelhouse_digest.py"


def make_package(root, name="llorch_probe", body="VALUE = 1\n"):
    package = root / name
    (package / name).mkdir(parents=True, exist_ok=True)
    (package / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{name.replace("_", "-")}"\nversion = "1.2.3"\n'
    )
    (package / name / "__init__.py").write_text(body)
    return package


def digest(sources, stamp):
    answer = subprocess.run(
        [
            sys.executable,
            str(DIGEST),
            "--constraints",
            str(REPO_ROOT / "requirements.txt"),
            "--stamp",
            str(stamp),
        ]
        + [str(s) for s in sources],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(answer.stdout)


def test_digest_ignores_caches_and_changes_with_the_sources(tmp_path):
    package = make_package(tmp_path)
    first = digest([package], tmp_path / "stamp")
    assert first["packages"] == {"llorch_probe": "1.2.3"}
    assert first["current"] is False
    (package / "llorch_probe" / "__pycache__").mkdir()
    (package / "llorch_probe" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"cache")
    (package / "build").mkdir()
    (package / "build" / "junk").write_text("build output")
    assert digest([package], tmp_path / "stamp")["digest"] == first["digest"]
    (package / "llorch_probe" / "__init__.py").write_text("VALUE = 2\n")
    assert digest([package], tmp_path / "stamp")["digest"] != first["digest"]


def test_a_project_without_a_version_is_one_clear_line(tmp_path):
    package = make_package(tmp_path)
    (package / "pyproject.toml").write_text('[project]\nname = "x"\n')
    answer = subprocess.run(
        [
            sys.executable,
            str(DIGEST),
            "--constraints",
            str(REPO_ROOT / "requirements.txt"),
            "--stamp",
            str(tmp_path / "stamp"),
            str(package),
        ],
        capture_output=True,
        text=True,
    )
    assert answer.returncode != 0
    assert "cannot read [project] name and version" in answer.stderr
    assert "Traceback" not in answer.stderr


@pytest.mark.timeout(240)
def test_builds_once_rebuilds_on_change_and_archives_are_reproducible(tmp_path):
    package = make_package(tmp_path / "src")
    wheelhouse = tmp_path / "wheelhouse"
    play = [
        {
            "name": "Wheelhouse",
            "hosts": "localhost",
            "gather_facts": False,
            "roles": [
                {
                    "role": "wheelhouse",
                    "wheelhouse_dir": str(wheelhouse),
                    "wheelhouse_sources": [str(package)],
                }
            ],
        }
    ]

    def build():
        rc, output = run_playbook(tmp_path, play, {"all": {"hosts": {}}})
        assert rc == 0, failures(output)
        return output["stats"]["localhost"]["changed"]

    assert build() > 0
    archive = wheelhouse / "llorch_probe.tar"
    with tarfile.open(archive) as tar:
        assert [m.name for m in tar.getmembers() if m.name.endswith(".whl")] == [
            "./llorch_probe-1.2.3-py3-none-any.whl"
        ]
    first_bytes = hashlib.sha256(archive.read_bytes()).hexdigest()

    assert build() == 0  # nothing changed: nothing built

    (wheelhouse / "BUILD-DIGEST").write_text("stale\n")  # force a rebuild of the same sources
    assert build() > 0
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == first_bytes

    (package / "llorch_probe" / "__init__.py").write_text("VALUE = 2\n")
    assert build() > 0
    assert hashlib.sha256(archive.read_bytes()).hexdigest() != first_bytes
