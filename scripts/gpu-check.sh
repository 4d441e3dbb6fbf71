#!/usr/bin/env bash
# What the kit sees on a real NVIDIA GPU, end to end, written to one folder.
#
# Run it on a GPU node, or on a builder that has a GPU and CUDA's compiler (nvcc):
#
#   scripts/gpu-check.sh OUTDIR
#
# 1. nvidia-smi's own answers (the table, -q, -q -x and the probe's --query-gpu CSV), saved as recordings;
# 2. the kit's GPU probe (plugins/module_utils/nvidia_smi.py: the agent's and nvidia_gpu_facts' reader) run
#    live, and the same reader run over each recording: every answer must name the same GPUs and driver;
# 3. the gpu_preflight role against this host (when ansible-playbook is on PATH);
# 4. llama-server built with CUDA by scripts/build-engine.sh (LLORCH_ENGINE_CUDA=1; set
#    LLORCH_ENGINE_CUDA_ARCHS to build for this GPU only, LLORCH_ENGINE_SOURCE where the package index is out of
#    reach), unpacked as a node unpacks it, loading the lab's tiny model with every layer on the GPU and
#    answering a chat completion; its log lines about CUDA and offloading, /slots, and the GPU memory the
#    process holds are kept.
#
# Environment: LLORCH_PYTHON (python with numpy, msgspec, gguf; default python3), LLORCH_VOCAB (the vocab
# GGUF; default `build-engine.sh --vocab`), LLORCH_ENGINE_JOBS (compile jobs). Exits non-zero at the first
# step that fails; OUTDIR/summary.txt says how far it got.
set -euo pipefail

[[ $# -eq 1 ]] || {
  echo "usage: gpu-check.sh OUTDIR" >&2
  exit 2
}
out=$(mkdir -p "$1" && cd "$1" && pwd)
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${LLORCH_PYTHON:-python3}
summary=$out/summary.txt
: >"$summary"

note() {
  echo "$*" | tee -a "$summary"
}
fail() {
  note "FAILED: $*"
  exit 1
}

# --- 1. nvidia-smi as it answers ---------------------------------------------------------------------------
command -v nvidia-smi >/dev/null || fail "nvidia-smi is not on PATH"
fields=$(cd "$repo_root/plugins/module_utils" && "$python" -c 'import nvidia_smi; print(",".join(nvidia_smi.QUERY_FIELDS))')
nvidia-smi >"$out/nvidia-smi.table.txt" 2>&1 || fail "nvidia-smi: $(tail -n 1 "$out/nvidia-smi.table.txt")"
# A recording this driver cannot make (an old one without -x, a field it refuses) is left out, not fatal.
nvidia-smi -q >"$out/nvidia-smi.q.txt" 2>&1 || rm -f "$out/nvidia-smi.q.txt"
nvidia-smi -q -x >"$out/nvidia-smi.q.xml" 2>&1 || rm -f "$out/nvidia-smi.q.xml"
nvidia-smi --query-gpu="$fields" --format=csv >"$out/nvidia-smi.query.csv" 2>&1 || rm -f "$out/nvidia-smi.query.csv"
note "nvidia-smi: $(grep -m1 -o 'Driver Version: [0-9.]*' "$out/nvidia-smi.table.txt"), $(grep -m1 -o 'CUDA Version: [0-9.]*' "$out/nvidia-smi.table.txt")"

# --- 2. the kit's probe, live and over the recordings ------------------------------------------------------
# A disagreement is reported, not fatal: the engine steps below say something of their own.
probe_ok=true
(cd "$repo_root/plugins/module_utils" && "$python" - "$out" <<'PY') >"$out/probe.json" 2>&1 || probe_ok=false
import dataclasses
import json
import sys
from pathlib import Path

import nvidia_smi

out = Path(sys.argv[1])


def facts(result):
    return {
        "driver_version": result.driver_version,
        "cuda_version": result.cuda_version,
        "gpus": [dataclasses.asdict(gpu) for gpu in result.gpus],
    }


live = facts(nvidia_smi.probe())
answers = {"live probe": live}
problems = []
for name in ("nvidia-smi.table.txt", "nvidia-smi.q.txt", "nvidia-smi.q.xml", "nvidia-smi.query.csv"):
    if not (out / name).exists():
        continue
    try:
        recorded = facts(nvidia_smi.parse_recorded((out / name).read_text()))
    except nvidia_smi.NvidiaSmiError as error:
        problems.append(f"{name}: {error}")
        continue
    answers[name] = recorded
    # The table shortens names and prints no UUIDs; every shape prints the indices.
    for key in ("index",) if name.endswith("table.txt") else ("index", "name"):
        if [gpu[key] for gpu in recorded["gpus"]] != [gpu[key] for gpu in live["gpus"]]:
            problems.append(f"{name}: GPU {key}s differ from the live probe")
    if recorded["driver_version"] not in (None, live["driver_version"]):
        problems.append(f"{name}: driver {recorded['driver_version']} != {live['driver_version']}")
json.dump({"answers": answers, "problems": problems}, sys.stdout, indent=2, default=str)
sys.exit(1 if problems else 0)
PY
live="$("$python" - "$out/probe.json" <<'PY'
import json
import sys

live = json.load(open(sys.argv[1]))["answers"]["live probe"]
gpus = "; ".join(
    f"{gpu['index']}: {gpu['name']}, cc {gpu['compute_capability']}, {gpu['vram_total_bytes']} bytes"
    for gpu in live["gpus"]
)
print(f"driver {live['driver_version']}, CUDA {live['cuda_version']} | {gpus}")
PY
)" || live="no live answer: $(tail -n 1 "$out/probe.json")"
$probe_ok || live="$live | DISAGREES: see probe.json"
note "probe: $live"

# --- 3. the preflight role ---------------------------------------------------------------------------------
if command -v ansible-playbook >/dev/null; then
  playbook=$(mktemp --suffix=.yml)
  cat >"$playbook" <<'YAML'
- name: GPU preflight on this host
  hosts: localhost
  gather_facts: false
  roles:
    - role: llorch.kit.gpu_preflight
YAML
  if ANSIBLE_COLLECTIONS_PATH=$repo_root/.collections ansible-playbook -i localhost, -c local \
    -e ansible_python_interpreter="$(command -v "$python")" "$playbook" \
    >"$out/preflight.log" 2>&1; then
    note "gpu_preflight: passed ($(grep -o 'ok=[0-9]*' "$out/preflight.log" | tail -n 1))"
  else
    note "gpu_preflight: FAILED: $(grep -m1 -E 'msg|ERROR' "$out/preflight.log" || tail -n 1 "$out/preflight.log")"
  fi
  rm -f "$playbook"
else
  note "gpu_preflight: not run (ansible-playbook is not on PATH)"
fi

# --- 4. the CUDA engine on this GPU ------------------------------------------------------------------------
started=$(date +%s)
archive=$(LLORCH_ENGINE_CUDA=1 bash "$repo_root/scripts/build-engine.sh" 2>"$out/build.stderr" | tail -n 1) ||
  fail "the CUDA build: $(tail -n 3 "$out/build.stderr")"
key_dir=$(dirname "$archive")
cp "$key_dir/build.log" "$out/build.log" 2>/dev/null || true
note "engine: $archive ($(cat "$key_dir/build-seconds" 2>/dev/null || echo '?') s to build; $(($(date +%s) - started)) s in this run)"

work=$(mktemp -d)
engine_pid=
cleanup() {
  [[ -z $engine_pid ]] || kill "$engine_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
tar -xzf "$archive" -C "$work"
tar -xzOf "$archive" llama-server/BUILD-INFO >"$out/BUILD-INFO"
vocab=${LLORCH_VOCAB:-$(bash "$repo_root/scripts/build-engine.sh" --vocab)}
"$python" "$repo_root/lab/model_mirror/make_gguf.py" --vocab "$vocab" "$work/model.gguf" >/dev/null
note "model: $(sha256sum "$work/model.gguf" | cut -c1-16)… $(stat -c %s "$work/model.gguf") bytes"

key_file=$work/api-key
(umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$key_file")
port=$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base=http://127.0.0.1:$port
"$work/llama-server/llama-server" -m "$work/model.gguf" --host 127.0.0.1 --port "$port" -c 2048 -np 2 \
  -ngl 99 --api-key-file "$key_file" --metrics >"$out/engine.log" 2>&1 &
engine_pid=$!
deadline=$(($(date +%s) + 120))
until [[ $(curl -s -o /dev/null -w '%{http_code}' "$base/health" || true) == 200 ]]; do
  kill -0 "$engine_pid" 2>/dev/null || fail "llama-server exited: $(tail -n 1 "$out/engine.log")"
  (($(date +%s) < deadline)) || fail "llama-server not healthy after 120 s: $(tail -n 1 "$out/engine.log")"
  sleep 0.2
done
note "engine healthy after $(($(date +%s) - deadline + 120)) s"

auth=(-H "Authorization: Bearer $(cat "$key_file")")
curl -s --fail-with-body "${auth[@]}" -H 'Content-Type: application/json' \
  -d '{"messages":[{"role":"user","content":"Say hello"}],"max_tokens":64,"temperature":0}' \
  "$base/v1/chat/completions" >"$out/completion.json" || fail "completion: $(cat "$out/completion.json")"
curl -s "${auth[@]}" "$base/slots" >"$out/slots.json"
curl -s "${auth[@]}" "$base/metrics" >"$out/metrics.txt"
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv >"$out/compute-apps.csv" 2>&1 || true
grep -iE 'cuda|offload|ggml_backend|using device|compute capability' "$out/engine.log" >"$out/engine-gpu-lines.txt" || true
# llama-server at its default verbosity prints no offload count; what the driver says the process holds is
# the proof that the model sits on the GPU.
note "on the GPU: $(grep "^$engine_pid," "$out/compute-apps.csv" || echo "no --query-compute-apps line for pid $engine_pid")"
answer=$("$python" - "$out/completion.json" <<'PY'
import json
import sys

answer = json.load(open(sys.argv[1]))
timings = answer.get("timings", {})
print(
    repr(answer["choices"][0]["message"]["content"][:60]),
    f"| {timings.get('predicted_n')} tokens at {timings.get('predicted_per_second') or 0:.0f} tokens/s,",
    f"prompt {timings.get('prompt_per_second') or 0:.0f} tokens/s",
)
PY
)
note "completion: $answer"
note "gpu-check: done"
