#!/usr/bin/python
# Copyright: llorch-kit contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: llorch_nodes_info
short_description: The GPU nodes registered with orchestratord
description:
  - Returns the nodes the llorch registry knows, optionally only those in some states, holding a model, or one
    node by id.
  - Each node comes back as the registry sends it, plus a C(summary) of figures a person or a C(when:) reads
    directly (pools ready, free slots, free VRAM, seconds since the last heartbeat).
  - With O(node_id) and O(wait_status) or O(wait_models), it waits until the registry knows the node and the
    node matches (for example until a restarted node is online again, or lists the models just staged), and
    fails after O(wait_timeout) seconds with what it last saw.
extends_documentation_fragment:
  - llorch.kit.llorch
  - llorch.kit.llorch.module
options:
  node_id:
    description:
      - Return only this node; C(nodes) is empty when the registry does not know it.
    type: str
  status:
    description:
      - Return only nodes in these states.
    type: list
    elements: str
    choices: [registering, online, draining, offline]
  model:
    description:
      - Return only nodes that hold this model.
    type: str
  wait_status:
    description:
      - With O(node_id), wait until the node is in one of these states.
    type: list
    elements: str
    choices: [registering, online, draining, offline]
  wait_models:
    description:
      - With O(node_id), wait until the node lists every one of these model ids (its agent reports the models
        staged on it at its next heartbeat).
    type: list
    elements: str
  wait_timeout:
    description:
      - Seconds to wait for O(wait_status) and O(wait_models) before the task fails.
    type: int
    default: 120
attributes:
  check_mode:
    support: full
    description: The module only reads; it runs the same in check mode, waits included.
  diff_mode:
    support: none
    description: Nothing to compare; the module changes nothing.
author:
  - llorch-kit contributors (@llorch-kit)
"""

EXAMPLES = r"""
- name: Read the online nodes that hold Llama 3.1 8B
  llorch.kit.llorch_nodes_info:
    url: "{{ llorch_controller_url }}"
    token: "{{ llorch_api_token }}"
    status: [online]
    model: meta-llama/Llama-3.1-8B-Instruct
  register: llama_nodes
  no_log: true

- name: Wait until gpu-1 is online and lists the models just staged (url and token from the environment)
  llorch.kit.llorch_nodes_info:
    node_id: gpu-1
    wait_status: [online]
    wait_models: [meta-llama/Llama-3.1-8B-Instruct]
    wait_timeout: 300
"""

RETURN = r"""
status:
  description:
    - The registry's HTTP status when it refused the call (401 for an unknown or revoked token, 403 for a
      credential whose scope does not allow it); null when it gave no HTTP answer.
  returned: failure
  type: int
  sample: 401
count:
  description: How many nodes were returned.
  returned: success, and when a wait runs out
  type: int
  sample: 2
nodes:
  description:
    - The nodes, sorted by node id, each as C(GET /v2/nodes) returns it plus C(summary).
    - When a wait runs out, the node as last seen (empty when the registry did not know it).
  returned: success, and when a wait runs out
  type: list
  elements: dict
  contains:
    node_id:
      description: The node's id.
      type: str
      sample: gpu-1
    status:
      description: One of C(registering), C(online), C(draining), C(offline).
      type: str
      sample: online
    address:
      description: The node agent's address.
      type: str
      sample: http://10.0.0.11:8080
    models:
      description: Model ids staged on the node.
      type: list
      elements: str
      sample: [meta-llama/Llama-3.1-8B-Instruct]
    served:
      description: Model ids its pools' engines are set up to serve, whatever their state.
      type: list
      elements: str
      sample: [meta-llama/Llama-3.1-8B-Instruct]
    pools:
      description:
        - Each pool's last reported status; its C(engine) is null for a pool without one, else C(kind),
          C(state) (C(loading), C(ready), C(busy) or C(dead)), C(model_id), C(url), C(version) and
          C(requests_deferred).
      type: list
      elements: dict
    last_heartbeat_at:
      description: UTC time of the last heartbeat, or null before the first one.
      type: str
      sample: "2026-11-25T06:00:00Z"
    summary:
      description: Figures derived from the record by this module.
      type: dict
      contains:
        pools_ready:
          description: Pools that report ready.
          type: int
        pools_total:
          description: Pools the node registered.
          type: int
        engines_total:
          description: Pools with an engine.
          type: int
        engines_serving:
          description: Engines that serve now (state C(ready) or C(busy)).
          type: int
        slots_free:
          description: Free slots over all pools.
          type: int
        slots_busy:
          description: Slots with a request in flight over all pools (engines loading or dead count none).
          type: int
        vram_free_bytes:
          description: Free VRAM over all pools, in bytes.
          type: int
        heartbeat_age_s:
          description:
            - Whole seconds since the last heartbeat by this host's clock, or null before the first one.
          type: int
      sample:
        pools_ready: 2
        pools_total: 2
        engines_total: 2
        engines_serving: 2
        slots_free: 7
        slots_busy: 1
        vram_free_bytes: 150323855360
        heartbeat_age_s: 3
"""

# Below the documentation blocks, where ansible-test's validate-modules wants imports.
from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.llorch.kit.plugins.module_utils.llorch_api import (  # noqa: E402
    LLORCH_ARGUMENT_SPEC,
    LlorchApiError,
    LlorchClient,
    node_summary,
    wait_for_node,
)
from ansible_collections.llorch.kit.plugins.module_utils.llorch_contract import NODE_STATUSES  # noqa: E402


def node_matches(node: dict, statuses: list[str] | None, models: list[str] | None) -> bool:
    return (not statuses or node.get("status") in statuses) and not missing_models(node, models)


def missing_models(node: dict, models: list[str] | None) -> list[str]:
    listed = set(node.get("models") or [])
    return [model for model in models or [] if model not in listed]


def last_seen(node: dict | None, models: list[str] | None) -> str:
    """What the wait saw last, for the failure message."""
    if node is None:
        return "the registry does not know the node"
    seen = f"status {node.get('status')}"
    missing = missing_models(node, models)
    if missing:
        seen += ", models not listed: " + ", ".join(missing)
    return seen


def wait_message(client: LlorchClient, node_id: str, statuses, models, timeout_s: int, node) -> str:
    wanted = []
    if statuses:
        wanted.append("status " + " or ".join(statuses))
    if models:
        wanted.append("models " + ", ".join(models) + " listed")
    return (
        f"node {node_id} did not reach {' and '.join(wanted)} at {client.url} within {timeout_s} s; "
        f"last seen: {last_seen(node, models)}"
    )


def main():
    module = AnsibleModule(
        argument_spec={
            **LLORCH_ARGUMENT_SPEC,
            "node_id": {"type": "str"},
            "status": {"type": "list", "elements": "str", "choices": list(NODE_STATUSES)},
            "model": {"type": "str"},
            "wait_status": {"type": "list", "elements": "str", "choices": list(NODE_STATUSES)},
            "wait_models": {"type": "list", "elements": "str"},
            "wait_timeout": {"type": "int", "default": 120},
        },
        required_by={"wait_status": "node_id", "wait_models": "node_id"},
        supports_check_mode=True,
    )
    params = module.params
    node_id, statuses, model = params["node_id"], params["status"], params["model"]
    wait_status, wait_models = params["wait_status"], params["wait_models"]
    wait_timeout = params["wait_timeout"]
    if wait_timeout < 0:
        module.fail_json(msg=f"wait_timeout must be 0 or more seconds, got {wait_timeout}")
    client = LlorchClient.from_module(module)
    try:
        if node_id and (wait_status or wait_models):
            node, matched = wait_for_node(
                client, node_id, lambda node: node_matches(node, wait_status, wait_models), wait_timeout
            )
            if not matched:
                # The last record goes with the failure, so a rescue or an assert can tell what is missing.
                seen = [{**node, "summary": node_summary(node)}] if node else []
                message = wait_message(client, node_id, wait_status, wait_models, wait_timeout, node)
                module.fail_json(msg=message, nodes=seen, count=len(seen))
            nodes = [node]
        elif node_id:
            node = client.get_node(node_id)
            nodes = [node] if node else []
        else:
            # One status is filtered by the registry; several are filtered here from one answer.
            nodes = client.list_nodes(status=statuses[0] if statuses and len(statuses) == 1 else None)
    except LlorchApiError as exc:
        # The HTTP status tells a rejected credential (401, 403) from a registry that did not answer (none).
        module.fail_json(msg=str(exc), status=exc.status)

    if statuses:
        nodes = [node for node in nodes if node.get("status") in statuses]
    if model:
        nodes = [node for node in nodes if model in (node.get("models") or [])]
    nodes = sorted(nodes, key=lambda node: node.get("node_id", ""))
    for node in nodes:
        node["summary"] = node_summary(node)
    module.exit_json(changed=False, nodes=nodes, count=len(nodes))


if __name__ == "__main__":
    main()
