#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks for the tests and the lab:
# podman with runc (crun fails in this sandbox), debootstrap for the lab image,
# an ssh client for the lab's connection, python3-venv for the dev venv.
# It also installs the shell linter that ansible-test sanity runs on scripts, and the
# compiler and cmake that scripts/build-engine.sh builds llama.cpp's llama-server with, and the headless
# browser (chromium and its driver, one Debian source at one version) that tests/test_cluster_page.py drives,
# and PostgreSQL 15's server, which the tests start themselves (tests/support_postgres.py): the install
# must not leave a cluster of its own running or enabled.
set -euo pipefail
wanted=(podman runc debootstrap openssh-client python3-venv curl wrk uidmap slirp4netns shellcheck cmake g++ make chromium chromium-driver postgresql libfaketime)
missing=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
sudo_cmd=()
[[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if [[ " ${missing[*]} " == *" postgresql "* ]]; then
    # postgresql-common reads this before it creates the "main" cluster that Debian would start at once.
    "${sudo_cmd[@]}" mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" |
      "${sudo_cmd[@]}" tee /etc/postgresql-common/createcluster.d/llorch-no-main-cluster.conf >/dev/null
  fi
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [[ " ${missing[*]} " == *" postgresql "* && -d /run/systemd/system ]]; then
    # The package enables its umbrella unit; nothing of ours needs it at boot (a PostgreSQL that was
    # already installed is left as its owner set it).
    "${sudo_cmd[@]}" systemctl disable --now --quiet postgresql.service
  fi
fi
