#!/usr/bin/env bash
# `make lab`: brings up (or re-converges) the local podman lab — one control
# host and two GPU nodes, systemd containers reached over SSH — and rolls the
# kit out onto it with site.yml, then prints the cluster state.
#
# Idempotent: running containers are reused, the key and the token are made
# once, and a second run must report changed=0 on every lab host.
#
#   LAB_PREFIX=llrole make lab    a separate lab (own containers, network, state)
#   LAB_MEASURE=1 make lab        also measure the per-task floor now and compare
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
# shellcheck source=lab/common.sh
source lab/common.sh

if [[ $(id -u) -ne 0 ]]; then
  die "the lab needs root: rootful podman gives each container an address the controller can reach"
fi

run_start=$(date +%s)
step "system packages (scripts/system-deps.sh)"
bash scripts/system-deps.sh
step "base image"
bash lab/image.sh

step "state in ${state_dir#"$repo"/}"
mkdir -p "$state_dir"
chmod 700 "$repo/.lab" "$state_dir"
if [[ ! -f $state_dir/id_ed25519 ]]; then
  ssh-keygen -q -t ed25519 -N '' -C "llorch-lab-$prefix" -f "$state_dir/id_ed25519"
  echo "made the lab's ssh key"
fi
if [[ ! -s $state_dir/api-token ]]; then
  # 48 url-safe characters; written 0600 from the start and never printed.
  (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(36))' >"$state_dir/api-token.new")
  mv "$state_dir/api-token.new" "$state_dir/api-token"
  echo "made the lab's API token (0600, not shown)"
fi
chmod 600 "$state_dir/api-token"

step "network $network"
if ! podman network exists "$network"; then
  podman network create --label "llorch.lab.prefix=$prefix" "$network" >/dev/null
  echo "created"
fi
subnet=$(podman network inspect "$network" --format '{{range .Subnets}}{{.Subnet}} {{end}}' | awk '{print $1}')
[[ $subnet == */24 ]] || die "network $network has subnet '$subnet'; the lab expects a /24 (podman's default)"
net_base=${subnet%.*}
# Fixed addresses: podman's CNI backend here has no DNS between containers, so
# every container gets /etc/hosts entries for the others, valid across restarts.
declare -A address=()
add_hosts=()
for i in "${!roles[@]}"; do
  name=${prefix}-${roles[$i]}
  address[$name]=$net_base.$((10 + i))
  add_hosts+=(--add-host "$name:${address[$name]}")
done

step "containers"
# How every lab container runs. CAP_SYS_ADMIN lets systemd build the services'
# mount namespaces: without it, it silently skips ProtectSystem, PrivateTmp
# and the like, and the hardening the roles set would not be in effect.
run_opts=(--runtime=runc --systemd=always --cap-add=SYS_ADMIN
  --ulimit nofile=1024:2048 --ulimit nproc=4096:8192)
image_recipe=$(podman image inspect --format '{{ index .Labels "llorch.lab.recipe" }}' "$image")
for role in "${roles[@]}"; do
  name=$prefix-$role
  # A container made with other settings or another image is made again.
  spec=$(printf '%s\n' "$image_recipe" "${address[$name]}" "${add_hosts[@]}" "${run_opts[@]}" | sha256sum | cut -c1-16)
  status=$(podman container inspect --format '{{.State.Status}}' "$name" 2>/dev/null || echo missing)
  if [[ $status != missing ]] &&
    [[ $(podman container inspect --format '{{ index .Config.Labels "llorch.lab.spec" }}' "$name") != "$spec" ]]; then
    podman rm -f -t 0 "$name" >/dev/null
    echo "$name: made with older settings, removed"
    status=missing
  fi
  case $status in
    running) echo "$name: running, reused" ;;
    missing)
      podman run -d --name "$name" --hostname "$name" \
        --label "llorch.lab.prefix=$prefix" --label "llorch.lab.spec=$spec" \
        --network "$network" --ip "${address[$name]}" "${add_hosts[@]}" \
        "${run_opts[@]}" "$image" /sbin/init >/dev/null
      echo "$name: started at ${address[$name]}"
      ;;
    *)
      podman start "$name" >/dev/null
      echo "$name: was $status, started"
      ;;
  esac
done

step "ssh"
pubkey=$(cat "$state_dir/id_ed25519.pub")
for role in "${roles[@]}"; do
  name=$prefix-$role
  # Rewrite only when different, so a re-run touches nothing in the container.
  podman exec "$name" sh -c 'umask 077; mkdir -p /root/.ssh
    grep -qxF "$0" /root/.ssh/authorized_keys 2>/dev/null || echo "$0" >>/root/.ssh/authorized_keys' "$pubkey"
done
for role in "${roles[@]}"; do
  name=$prefix-$role
  wait_for "$name: sshd answers" 90 lab_ssh "${address[$name]}" true
done

step "inventory ${inventory#"$repo"/}"
write_inventory
echo "written for hosts: ${!address[*]}"

summary=()
playbooks=(lab/prepare.yml)
# The staging helper's model mirror joins the preparation once it exists.
[[ -f lab/model_mirror.yml ]] && playbooks+=(lab/model_mirror.yml)
run_playbook "${playbooks[@]}"
# Both lab GPU nodes in one batch: the lab serves no traffic that a rolling
# restart would protect (playbooks/upgrade.yml still goes one node at a time).
# An extra var, because a play's `serial` cannot see inventory variables.
run_playbook site.yml -e llorch_node_serial=2
site_wall=$last_wall site_runs=$last_runs
if [[ ${LAB_MEASURE:-0} == 1 ]]; then
  run_playbook lab/floor.yml >/dev/null
  measured=$(awk -v sw="$site_wall" -v sr="$site_runs" -v fw="$last_wall" -v fr="$last_runs" 'BEGIN {
    per_task = sw / sr; floor = fw / fr
    printf "site.yml %.3f s per task run; floor now %.3f s (lab/floor.yml); ratio %.2f (goal <= 1.3)", per_task, floor, per_task / floor }')
  summary+=("$measured")
fi
run_playbook playbooks/status.yml

# The proof that the lab serves: one chat completion streamed through the controller's gateway with the lab's
# client key, read here from its 0600 file (made by site.yml). The header reaches curl on its stdin (-H @-,
# printf being a shell builtin): the key is in no process's argv, and never printed.
control_url=https://${address[$prefix-control]}:9200
client_key_file=$state_dir/client-keys/default
# The lab is TLS-only: curl trusts the lab's own CA (made by site.yml, role llorch_pki) and nothing else.
ca_file=$state_dir/pki/ca.crt
[[ -s $ca_file ]] || die "no CA certificate in ${ca_file#"$repo"/}; site.yml makes it (role llorch_pki)"
[[ -s $client_key_file ]] || die "no client key in ${client_key_file#"$repo"/}; site.yml makes it (orchestratord_client_keys)"
model=$(python3 -c 'import sys, yaml
print(next(p["engine"]["model"] for p in yaml.safe_load(open(sys.argv[1]))["pool_managerd_pools"] if "engine" in p))' \
  inventories/lab/group_vars/gpu_nodes/main.yml)
body=$(python3 -c 'import json, sys
print(json.dumps({"model": sys.argv[1], "stream": True, "max_tokens": 16,
                  "messages": [{"role": "user", "content": "Say hello to the lab."}]}))' "$model")
step "a chat completion streamed through the controller's gateway $control_url/v1/chat/completions (random weights: gibberish)"
printf 'Authorization: Bearer %s\n' "$(<"$client_key_file")" |
  curl -sS -N --max-time 60 --cacert "$ca_file" -H @- -H 'Content-Type: application/json' --data-binary "$body" \
    "$control_url/v1/chat/completions" |
  python3 lab/sse_reply.py "$(date +%s.%N)"
summary+=("first chat completion $(($(date +%s) - run_start)) s after make lab started")

step "summary (LAB_PREFIX=$prefix)"
printf '%s\n' "${summary[@]}"
if ((lab_changed_total == 0)); then
  echo "idempotent: changed=0 on every lab host in every playbook"
else
  echo "changes on lab hosts: $lab_changed_total (a re-run of an unchanged lab should make none)"
fi
echo "lab up in $(($(date +%s) - run_start)) s; token in ${state_dir#"$repo"/}/api-token; client key in ${client_key_file#"$repo"/}; CA in ${ca_file#"$repo"/}; controller URL $control_url (OpenAI API at $control_url/v1)"
