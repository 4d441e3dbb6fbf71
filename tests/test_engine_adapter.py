"""The engine file and the llama.cpp adapter: strict reading, the launch command, and the engine's answers
as recorded from this build and as older llama.cpp versions wrote them (tests/data/engine/README.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import REPO_ROOT
from support_engine import engine_archive, unpack_engine

sys.path.insert(0, str(REPO_ROOT / "files" / "pool_managerd"))
from pool_managerd.config_file import ConfigError
from pool_managerd.engine_config import load_engine_file
from pool_managerd.engines import EngineAnswerError, Metrics, Slots, adapter_for

RECORDED = REPO_ROOT / "tests" / "data" / "engine"
THIS_BUILD = RECORDED / "llama-server-b0-unknown"
README_2024 = RECORDED / "llama-server-2024-readme"
LLAMA = adapter_for("llama.cpp")

GOOD = {
    "pool_id": "p0",
    "kind": "llama.cpp",
    "model_id": "llorch-lab/tiny",
    "models_dir": "/var/lib/llorch/models",
    "binary": "/opt/llorch-engine/current/llama-server",
    "host": "10.89.0.11",
    "port": 8101,
    "url": "http://10.89.0.11:8101",
    "gpus": [0, 1],
    "context_size": 2048,
    "parallel": 2,
    "extra_args": ["--threads", "4"],
}


def engine_file(tmp_path: Path, **changes) -> Path:
    body = {**GOOD, **changes}
    for key in [key for key, value in changes.items() if value is ...]:
        del body[key]
    path = tmp_path / "p0.yml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_the_designs_engine_file_reads_as_written(tmp_path):
    engine = load_engine_file(engine_file(tmp_path), pool_id="p0")
    assert (engine.port, engine.parallel, engine.extra_args) == (8101, 2, ("--threads", "4"))
    assert engine.cuda_visible_devices == "0,1"
    assert load_engine_file(engine_file(tmp_path, gpus=[])).cuda_visible_devices == ""


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"port": 0}, "'port' must be a port from 1 to 65535, not 0"),
        ({"port": 65536}, "'port' must be a port from 1 to 65535"),
        ({"kind": "vllm"}, "'kind' must be one of llama.cpp, not 'vllm'"),
        ({"extra_args": ["ok", "a\x00b"]}, "'extra_args[1]' must be a string of at most 256 characters"),
        ({"extra_args": ["x" * 257]}, "'extra_args[0]' must be a string of at most 256 characters"),
        ({"extra_args": ["-v"] * 65}, "'extra_args' must be a list of at most 64 strings"),
        ({"parallel": 0}, "'parallel' must be a whole number from 1 to 256"),
        ({"parallel": "2"}, "'parallel' must be a whole number from 1 to 256, not '2'"),
        ({"binary": "bin/llama-server"}, "'binary' must be an absolute path"),
        ({"url": "ftp://x"}, "'url' must be http:// or https://"),
        ({"model_id": "bad model"}, "'model_id' must be letters, digits"),
        ({"pool_id": "../p0"}, "'pool_id' must be letters, digits"),
        ({"prot": 8101}, "unknown key 'prot' (known: pool_id, kind, model_id"),
        ({"url": ...}, "'url' is required"),
    ],
)
def test_a_bad_engine_file_is_one_line_naming_the_file_and_the_key(tmp_path, change, message):
    path = engine_file(tmp_path, **change)
    with pytest.raises(ConfigError) as caught:
        load_engine_file(path)
    assert str(caught.value).startswith(f"engine file {path}: ")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_engine_file_for_another_pool_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="describes pool 'p0', not pool 'p1'"):
        load_engine_file(engine_file(tmp_path), pool_id="p1")


def test_argv_carries_the_settings_the_key_file_and_no_key(tmp_path):
    engine = load_engine_file(engine_file(tmp_path))
    argv = LLAMA.argv(engine, "/proc/self/fd/3", "/run/credentials/x/engine-api-key", help_text="")
    assert argv == [
        "/opt/llorch-engine/current/llama-server",
        *("-m", "/proc/self/fd/3", "--alias", "llorch-lab/tiny", "--host", "10.89.0.11", "--port", "8101"),
        *("-c", "2048", "-np", "2", "--api-key-file", "/run/credentials/x/engine-api-key", "--metrics"),
        *("--threads", "4"),
    ]


def test_argv_turns_the_web_ui_off_where_the_real_build_knows_the_switch(tmp_path):
    binary = unpack_engine(engine_archive(), tmp_path)
    help_text = subprocess.run(
        [str(binary), "--help"], capture_output=True, text=True, timeout=30, env={}, check=True
    ).stdout
    argv = LLAMA.argv(load_engine_file(engine_file(tmp_path)), "/m.gguf", "/k", help_text)
    assert argv[argv.index("--metrics") + 1] == "--no-webui"
    assert argv[-2:] == ["--threads", "4"], "extra_args come last, so they can override"


@pytest.mark.parametrize(("status", "reading"), [(200, "healthy"), (503, "loading"), (500, "failing")])
def test_health_is_read_from_the_status_code_alone(status, reading):
    assert LLAMA.health(status) == reading


@pytest.mark.parametrize(
    ("recording", "slots"),
    [
        (THIS_BUILD / "slots-idle.json", Slots(total=2, processing=0)),
        (THIS_BUILD / "slots-one-of-two-processing.json", Slots(total=2, processing=1)),
        (THIS_BUILD / "slots-two-of-two-processing.json", Slots(total=2, processing=2)),
        (README_2024 / "slots-idle.json", Slots(total=2, processing=0)),
        (README_2024 / "slots-one-of-two-processing.json", Slots(total=2, processing=1)),
    ],
    ids=lambda value: f"{value.parent.name}/{value.name}" if isinstance(value, Path) else "",
)
def test_slots_of_each_llama_cpp_version_are_counted(recording, slots):
    assert LLAMA.slots(recording.read_bytes()) == slots


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"<html>", "/slots: not JSON"),
        (b"[]", "not a non-empty list"),
        (b'{"error": {"code": 501}}', "not a non-empty list"),
        (b"[1]", "slot 0 is not an object"),
        (b'[{"id": 0, "state": true}]', "neither is_processing nor state"),
        (b'[{"id": 0}]', "neither is_processing nor state"),
        (b"[" + b",".join([b'{"state": 0}'] * 257) + b"]", "257 slots, more than 256"),
    ],
)
def test_an_unreadable_slots_answer_is_one_line(body, problem):
    with pytest.raises(EngineAnswerError, match=problem.replace("(", r"\(")):
        LLAMA.slots(body)


@pytest.mark.parametrize(
    ("recording", "metrics"),
    [
        (THIS_BUILD / "metrics-idle.txt", Metrics(requests_deferred=0, requests_processing=0)),
        (THIS_BUILD / "metrics-one-deferred.txt", Metrics(requests_deferred=1, requests_processing=1)),
        (README_2024 / "metrics-two-deferred.txt", Metrics(requests_deferred=2, requests_processing=2)),
    ],
    ids=lambda value: f"{value.parent.name}/{value.name}" if isinstance(value, Path) else "",
)
def test_metrics_of_each_llama_cpp_version_give_deferred_and_processing(recording, metrics):
    assert LLAMA.metrics(recording.read_bytes()) == metrics


@pytest.mark.parametrize("value", ["-1", "NaN", "1e9", "1.5", "many"])
def test_a_metric_that_is_no_count_is_refused(value):
    with pytest.raises(EngineAnswerError, match="llamacpp:requests_deferred"):
        LLAMA.metrics(f"llamacpp:requests_deferred {value}\n".encode())


def test_metrics_without_the_counters_read_as_unknown():
    assert LLAMA.metrics(b"# nothing\n") == Metrics(None, None)


def test_version_comes_from_props_when_the_build_says_it():
    assert LLAMA.version((THIS_BUILD / "props.json").read_bytes()) == "b0-unknown"
    assert LLAMA.version(b'{"total_slots": 2}') is None
    assert LLAMA.version(b'{"build_info": "b1\\nforged log line"}') is None
    assert LLAMA.version(b"not json") is None
