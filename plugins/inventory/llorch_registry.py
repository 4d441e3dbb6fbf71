# Copyright: llorch-kit contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
name: llorch_registry
short_description: The GPU nodes registered with orchestratord, as inventory
description:
  - Asks the llorch registry (orchestratord, C(GET /v2/nodes)) for its nodes and makes each one a host.
  - Groups C(llorch_nodes) (every node), C(llorch_online), C(llorch_offline), C(llorch_draining),
    C(llorch_registering) (always defined, possibly empty), and one group per model held by an online node,
    C(llorch_model_<model id>) with every character outside C([A-Za-z0-9_]) made C(_).
  - One group per model an engine of an online node serves now (engine state C(ready) or C(busy)),
    C(llorch_serving_<model id>), sanitized the same way; a node that only stages the model is in its
    C(llorch_model_) group, not in this one.
  - C(llorch_engine_down) (always defined, possibly empty) holds the online and draining nodes with at
    least one engine that does not serve (state C(loading) or C(dead)), so a playbook can look at them.
  - Host variables C(llorch_node_id), C(llorch_status), C(llorch_address), C(llorch_models) (model ids
    staged), C(llorch_served) (model ids its engines serve now), C(llorch_engines) (per pool with an engine,
    its C(pool_id), C(kind), C(state), C(model_id) and C(url)), C(llorch_pools) (pool ids), C(llorch_gpus)
    (how many GPUs), C(llorch_last_heartbeat_at) (UTC, null before the first heartbeat), and with
    O(set_ansible_host) C(ansible_host) (the host part of the node's address).
  - Host variables are kept lean (ids and a count), because Ansible's time per host grows with the size of its
    variables; set O(detailed_vars) to add whole pool and GPU records.
  - Uses a YAML configuration file whose name ends with C(.llorch_registry.yml) or C(.llorch_registry.yaml).
extends_documentation_fragment:
  - constructed
  - inventory_cache
  - llorch.kit.llorch
  - llorch.kit.llorch.plugin
options:
  plugin:
    description: The name of this plugin; it marks the file as one for this plugin.
    required: true
    type: str
    choices: [llorch.kit.llorch_registry, llorch_registry]
  statuses:
    description:
      - Keep only nodes in these states. Groups for the states left out stay empty.
    type: list
    elements: str
    choices: [registering, online, draining, offline]
    default: [registering, online, draining, offline]
  set_ansible_host:
    description:
      - Set C(ansible_host) to the host part of the address each node registered.
      - Off by default, because that address is whatever the node (or anyone holding the shared API token)
        last registered, and Ansible would connect there with SSH and C(become). Hosts then keep the
        connection settings of a static inventory, or are reached by their name (the node id).
      - In the layered use C(-i static -i registry) the registry comes last, so with this on its address
        overrides the C(ansible_host) of the static inventory.
    type: bool
    default: false
  detailed_vars:
    description:
      - Also set C(llorch_pools_detail), each pool's last reported status (slots, VRAM, models, ready,
        draining, its whole engine record), and C(llorch_gpus_detail), each GPU's capabilities record
        (name, VRAM, compute capability, driver).
      - Whole records cost Ansible noticeably more time on large inventories (see the README's figures).
    type: bool
    default: false
"""

EXAMPLES = r"""
# The smallest file takes url and token from LLORCH_URL and LLORCH_API_TOKEN:
#   plugin: llorch_registry

# Two orchestratord replicas: the first that answers gives the inventory.
#   plugin: llorch_registry
#   url: [https://ctl-1.example.com:9200, https://ctl-2.example.com:9200]

# A production file: the controller's reader credential (a 0600 file that role orchestratord issues: the
# inventory only reads, so it needs no more than a reader), only nodes that are up, groups by GPU model. It
# sets no ansible_host (set_ansible_host: false), so the static inventory listed before it says where to
# connect.
plugin: llorch_registry
url: https://llorch-control.example.com:9200
token_file: ~/.local/share/llorch-kit/credentials/reader.token
ca_path: ~/.local/share/llorch-kit/pki/ca.crt
statuses: [online, draining]
keyed_groups:
  - key: llorch_gpus | string
    prefix: gpus
compose:
  ansible_user: "'ops'"
groups:
  big_nodes: llorch_gpus >= 8
cache: true
cache_plugin: jsonfile
cache_connection: ~/.cache/llorch-inventory
cache_timeout: 60
"""

# Below the documentation blocks, where ansible-test's validate-modules wants imports.
import json  # noqa: E402
import re  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

from ansible.errors import AnsibleParserError  # noqa: E402
from ansible.plugins.inventory import BaseInventoryPlugin, Cacheable, Constructable  # noqa: E402
from ansible_collections.llorch.kit.plugins.module_utils import llorch_api  # noqa: E402
from ansible_collections.llorch.kit.plugins.module_utils.llorch_contract import (  # noqa: E402
    ENGINE_SERVING_STATES,
    NODE_STATUSES,
    valid_node_id,
)

BASE_GROUP = "llorch_nodes"
# 2: ansible_host is no longer in the cached records (set_ansible_host adds it on reading)
# 3: records carry llorch_served and llorch_engines
CACHE_FORMAT = 3
STATUS_GROUPS = {status: f"llorch_{status}" for status in NODE_STATUSES}
ENGINE_DOWN_GROUP = "llorch_engine_down"
# Nodes whose agent speaks now: an offline node's engine states are as old as its last heartbeat.
_AGENT_ALIVE = ("online", "draining")
_UNSAFE_IN_GROUP = re.compile(r"[^A-Za-z0-9_]")


def model_group(model_id: str) -> str:
    """The group for the online nodes that hold `model_id`."""
    return "llorch_model_" + _UNSAFE_IN_GROUP.sub("_", model_id)


def serving_group(model_id: str) -> str:
    """The group for the online nodes with an engine that serves `model_id` now."""
    return "llorch_serving_" + _UNSAFE_IN_GROUP.sub("_", model_id)


def engine_records(pools: list) -> list[dict]:
    """Each pool's engine, lean: what a playbook targets by (no version, no counters)."""
    records = []
    for pool in pools:
        engine = pool.get("engine") if isinstance(pool, dict) else None
        if isinstance(engine, dict):
            records.append(
                {
                    "pool_id": pool.get("pool_id"),
                    "kind": engine.get("kind"),
                    "state": engine.get("state"),
                    "model_id": engine.get("model_id"),
                    "url": engine.get("url"),
                }
            )
    return records


def address_host(address: str) -> str | None:
    """The host part of a node's address: http://10.0.0.5:8080 -> 10.0.0.5, http://[fd00::5]:80 -> fd00::5."""
    if not address:
        return None
    try:
        return urlsplit(address if "://" in address else "//" + address).hostname
    except ValueError:
        return None


def host_record(node: dict, detailed: bool) -> dict:
    """The host variables for one registry node (what the cache stores)."""
    pools = node.get("pools") or []
    gpus = (node.get("capabilities") or {}).get("gpus") or []
    engines = engine_records(pools)
    record = {
        "llorch_node_id": node["node_id"],
        "llorch_status": node.get("status"),
        "llorch_address": node.get("address"),
        "llorch_models": list(node.get("models") or []),
        "llorch_served": sorted(
            {engine["model_id"] for engine in engines if engine["state"] in ENGINE_SERVING_STATES}
        ),
        "llorch_engines": engines,
        "llorch_pools": [pool.get("pool_id") for pool in pools],
        "llorch_gpus": len(gpus),
        "llorch_last_heartbeat_at": node.get("last_heartbeat_at"),
    }
    if detailed:
        record["llorch_pools_detail"] = pools
        record["llorch_gpus_detail"] = gpus
    return record


class InventoryModule(BaseInventoryPlugin, Constructable, Cacheable):
    NAME = "llorch.kit.llorch_registry"

    def verify_file(self, path):
        return super().verify_file(path) and path.endswith((".llorch_registry.yml", ".llorch_registry.yaml"))

    def parse(self, inventory, loader, path, cache=True):
        super().parse(inventory, loader, path, cache)
        self._read_config_data(path)
        records = self._host_records(path, cache)
        self._populate(records)

    def _option(self, name):
        """An option's value, rendered when the file wrote it as a template (a lookup, a vault string)."""
        value = self.get_option(name)
        if isinstance(value, list):  # url: each of the registry's URLs may be a template
            return [self._rendered(item) for item in value]
        return self._rendered(value)

    def _rendered(self, value):
        if isinstance(value, str) and self.templar.is_template(value):
            value = self.templar.template(value)
        return value

    def _host_records(self, path, cache):
        """Host records from the cache when it is on and not flushed, else from the registry."""
        detailed = self.get_option("detailed_vars")
        cache_on = self.get_option("cache")
        cache_key = self.get_cache_key(path)
        if cache_on and cache:
            try:
                cached = self._cache[cache_key]
            except KeyError:
                cached = None  # expired or never written
            # A cache written by another version or with the other variable shape is a miss, not stale data.
            wanted = {"format": CACHE_FORMAT, "detailed_vars": detailed}
            if isinstance(cached, dict) and all(cached.get(key) == value for key, value in wanted.items()):
                try:
                    return json.loads(cached["hosts_json"])
                except (KeyError, TypeError, ValueError):
                    pass  # a damaged entry: ask the registry and write it again
        try:
            client = llorch_api.LlorchClient.from_options(self._option)
            nodes = client.list_nodes()
        except llorch_api.LlorchApiError as exc:
            raise AnsibleParserError(str(exc)) from None
        records = [host_record(node, detailed) for node in nodes if valid_node_id(node.get("node_id"))]
        refused = len(nodes) - len(records)
        if refused:
            # Never a host named after the controller ("localhost"): the daemon refuses such a registration
            # today, but a registry of another version or a restored database may still hold one.
            self.display.warning(f"llorch_registry: left out {refused} node(s) whose id is no valid node id")
        if cache_on:
            # The records go in as one JSON string: Ansible's cache layer deep-copies and walks every value
            # it is given, which costs more than the registry request itself at 10,000 nodes.
            self._cache[cache_key] = {
                "format": CACHE_FORMAT,
                "detailed_vars": detailed,
                "hosts_json": json.dumps(records, separators=(",", ":")),
            }
        return records

    def _populate(self, records):
        inventory = self.inventory
        for group in (BASE_GROUP, *STATUS_GROUPS.values(), ENGINE_DOWN_GROUP):
            inventory.add_group(group)
        wanted = set(self.get_option("statuses"))
        compose = self.get_option("compose")
        groups = self.get_option("groups")
        keyed_groups = self.get_option("keyed_groups")
        strict = self.get_option("strict")
        constructed = bool(compose or groups or keyed_groups)
        set_ansible_host = self.get_option("set_ansible_host")

        for record in records:
            status = record["llorch_status"]
            if status not in wanted:
                continue
            if set_ansible_host:
                address = address_host(record.get("llorch_address") or "")
                if address:
                    record = {"ansible_host": address, **record}
            host = inventory.add_host(record["llorch_node_id"], group=BASE_GROUP)
            for name, value in record.items():
                inventory.set_variable(host, name, value)
            if status in STATUS_GROUPS:
                inventory.add_child(STATUS_GROUPS[status], host)
            if status == "online":
                for model_id in record["llorch_models"]:
                    inventory.add_child(inventory.add_group(model_group(model_id)), host)
                for model_id in record["llorch_served"]:
                    inventory.add_child(inventory.add_group(serving_group(model_id)), host)
            if status in _AGENT_ALIVE and any(
                engine["state"] not in ENGINE_SERVING_STATES for engine in record["llorch_engines"]
            ):
                inventory.add_child(ENGINE_DOWN_GROUP, host)
            if constructed:
                self._set_composite_vars(compose, record, host, strict=strict)
                self._add_host_to_composed_groups(groups, record, host, strict=strict)
                self._add_host_to_keyed_groups(keyed_groups, record, host, strict=strict)
