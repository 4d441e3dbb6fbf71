#!/usr/bin/env bash
# Builds the base image that the lab and molecule boot: Debian 12 minbase with
# systemd, sshd and Python, made by debootstrap and imported into podman.
# Skipped when an image built from the same recipe already exists, so it costs
# about a minute once per machine. Several worktrees may call this at once: a
# lock makes the second caller wait for the first build instead of doubling it.
#
#   bash lab/image.sh            build when missing (or when the recipe changed)
#   LAB_IMAGE_REBUILD=1 bash lab/image.sh   force a rebuild
set -euo pipefail

here=$(dirname "${BASH_SOURCE[0]}")
image=${LAB_IMAGE:-localhost/llorch-lab-base:bookworm}
suite=bookworm
# What the roles expect on a bare host: Python with venv for the services, a
# real systemd, sshd for the lab's connection; sudo and acl for become_user.
packages=python3,python3-venv,systemd,systemd-sysv,dbus,iproute2,procps,ca-certificates,openssh-server,sudo,acl
# Bump when the steps below change, so existing hosts pick up a new image.
recipe_version=2
recipe=$(printf '%s\n' "$suite" "$packages" "$recipe_version" | sha256sum | cut -c1-16)

image_is_current() {
  [[ $(podman image inspect --format '{{ index .Labels "llorch.lab.recipe" }}' "$image" 2>/dev/null) == "$recipe" ]]
}

if [[ ${LAB_IMAGE_REBUILD:-0} != 1 ]] && image_is_current; then
  echo "image: $image is current (recipe $recipe), not rebuilt"
  exit 0
fi

exec 9>/var/tmp/llorch-lab-image.lock
flock 9
# Another caller may have built it while this one waited for the lock.
if [[ ${LAB_IMAGE_REBUILD:-0} != 1 ]] && image_is_current; then
  echo "image: $image was built by another run meanwhile"
  exit 0
fi

# The mirror and proxy are the ones this machine's apt already uses (the repo
# names no mirror): the first enabled `deb` source for $suite main, and apt's
# Acquire::http(s)::Proxy for it. LAB_DEBIAN_MIRROR overrides the mirror; an
# http_proxy/https_proxy already in the environment wins over apt's proxy.
if [[ -n ${LAB_DEBIAN_MIRROR:-} ]]; then
  mirror=$LAB_DEBIAN_MIRROR
  mirror_from="LAB_DEBIAN_MIRROR"
else
  # On failure apt_source.py has said, in one line, what it looked for and that
  # LAB_DEBIAN_MIRROR is the way out.
  mirror=$(python3 "$here/apt_source.py" mirror --suite "$suite") || exit 1
  mirror_from="this machine's apt sources"
fi
proxy_var=${mirror%%://*}_proxy
if [[ $proxy_var == http_proxy || $proxy_var == https_proxy ]] && [[ -z ${!proxy_var:-} ]]; then
  apt_proxy=$({ apt-config dump 2>/dev/null || true; } | python3 "$here/apt_source.py" proxy --mirror "$mirror")
  if [[ -n $apt_proxy ]]; then
    export "$proxy_var=$apt_proxy"
    # The proxy URL may carry a password: say where it came from, not what it is.
    mirror_from+=", through apt's proxy"
  fi
fi

start=$(date +%s)
rootfs=$(mktemp -d /var/tmp/llorch-lab-rootfs.XXXXXX)
trap 'rm -rf --one-file-system "$rootfs"' EXIT

# Credentials in a mirror URL (user:password@) stay out of the log.
echo "image: debootstrap $suite from $(sed -E 's#//[^/@]*@#//#' <<<"$mirror") ($mirror_from; about a minute)"
debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
  tail -n 30 "$rootfs.log" >&2
  echo "image: debootstrap failed; full log in $rootfs.log" >&2
  exit 1
}
rm -f "$rootfs.log"

# Every container must get its own machine id and ssh host keys at first boot,
# not share the ones debootstrap made.
: >"$rootfs/etc/machine-id"
rm -f "$rootfs"/etc/ssh/ssh_host_*
cat >"$rootfs/etc/systemd/system/ssh-host-keys.service" <<'EOF'
[Unit]
Description=Generate this container's SSH host keys
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
EOF
ln -sf ../ssh-host-keys.service "$rootfs/etc/systemd/system/multi-user.target.wants/ssh-host-keys.service"
# Keys only, no passwords; root logs in with the lab's key.
cat >"$rootfs/etc/ssh/sshd_config.d/llorch-lab.conf" <<'EOF'
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UseDNS no
EOF
# Units that have nothing to do in a container and would leave systemd
# "degraded" (converge waits for "running").
for unit in getty@tty1.service console-getty.service \
  systemd-remount-fs.service sys-kernel-debug.mount sys-kernel-tracing.mount; do
  ln -sf /dev/null "$rootfs/etc/systemd/system/$unit"
done
# Smaller image: apt caches and lists are rebuilt by apt when needed.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

echo "image: importing into podman as $image"
tar -C "$rootfs" --numeric-owner -c . | podman import \
  --change 'CMD=["/sbin/init"]' \
  --change 'STOPSIGNAL=SIGRTMIN+3' \
  --change "LABEL=llorch.lab.recipe=$recipe" \
  --quiet - "$image" >/dev/null
echo "image: built $image in $(($(date +%s) - start)) s"
