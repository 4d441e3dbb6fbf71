#!/usr/bin/env bash
# Molecule's dependency step (molecule/*/molecule.yml): makes sure the lab's
# base image exists and makes the key and token the scenarios use, under
# .lab/molecule/ (gitignored), the lab's tiny real GGUF the default scenario's
# engine serves, and the scenarios' network with the fixed subnet their
# molecule.yml addresses live in. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash lab/image.sh
state=.lab/molecule
mkdir -p "$state"
chmod 700 .lab "$state"
# The public key is bind-mounted read-only as each instance's authorized_keys.
[[ -f $state/id_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -C llorch-molecule -f "$state/id_ed25519"
if [[ ! -s $state/api-token ]]; then
  (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(36))' >"$state/api-token")
fi
network=molecule-llorch
if ! podman network exists "$network"; then
  podman network create --subnet 10.89.240.0/24 --label llorch.lab.prefix=molecule "$network" >/dev/null
fi
# The tiny real model (2-layer llama, random weights, the engine source's own tokenizer): same inputs, same
# bytes (sha256 a33e6dee...), so molecule.yml lists its digest. The gguf package is in the repo's venv.
if [[ ! -s $state/llorch-lab-tiny.gguf ]]; then
  python=.venv/bin/python
  [[ -x $python ]] || python=python3
  "$python" lab/model_mirror/make_gguf.py --vocab "$(bash scripts/build-engine.sh --vocab)" "$state/llorch-lab-tiny.gguf"
fi
