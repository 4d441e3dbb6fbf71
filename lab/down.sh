#!/usr/bin/env bash
# `make lab-down`: removes this prefix's lab — containers, network, generated
# state and inventory. Keeps the cached base image (lab/image.sh) so the next
# `make lab` starts in seconds. Never touches another prefix's lab.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
# shellcheck source=lab/common.sh
source lab/common.sh

containers=()
for role in "${roles[@]}"; do
  podman container exists "$prefix-$role" && containers+=("$prefix-$role")
done
if ((${#containers[@]})); then
  # -t 0: a systemd container would otherwise wait 10 s for its stop signal.
  podman rm -f -t 0 "${containers[@]}" >/dev/null
  echo "removed containers: ${containers[*]}"
fi
if podman network exists "$network"; then
  podman network rm "$network" >/dev/null
  echo "removed network: $network"
fi
if [[ -d $state_dir ]]; then
  rm -rf "$state_dir"
  echo "removed state: ${state_dir#"$repo"/} (key, token, CA and certificates, logs)"
fi
# The inventory is shared by whichever lab ran last in this checkout: remove it
# only when it is this prefix's.
if [[ -f $inventory ]] && head -n 1 "$inventory" | grep -qF "$inventory_marker;"; then
  rm -f "$inventory"
  echo "removed inventory: ${inventory#"$repo"/}"
fi
echo "lab $prefix is down (base image $image kept)"
