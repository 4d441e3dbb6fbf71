#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks for the tests and the lab:
# podman with runc (crun fails in this sandbox), debootstrap for the lab image,
# an ssh client for the lab's connection, python3-venv for the dev venv.
# It also installs the shell linter that ansible-test sanity runs on scripts, and the
# compiler and cmake that scripts/build-engine.sh builds llama.cpp's llama-server with, and the headless
# browser (chromium and its driver, one Debian source at one version) that tests/test_cluster_page.py drives.
set -euo pipefail
wanted=(podman runc debootstrap openssh-client python3-venv curl wrk uidmap slirp4netns shellcheck cmake g++ make chromium chromium-driver)
missing=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  sudo_cmd=()
  [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
