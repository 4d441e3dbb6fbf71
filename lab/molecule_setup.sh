#!/usr/bin/env bash
# Molecule's dependency step (molecule/*/molecule.yml): makes sure the lab's
# base image exists and makes the key and token the scenarios use, under
# .lab/molecule/ (gitignored), and the scenarios' network with the fixed
# subnet their molecule.yml addresses live in. Safe to run again.
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
