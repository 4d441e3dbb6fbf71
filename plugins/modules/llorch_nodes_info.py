#!/usr/bin/python
# Copyright: llorch-kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.llorch.kit.plugins.module_utils.llorch_api import (
    LLORCH_ARGUMENT_SPEC,
    NODE_STATUSES,
    LlorchApiError,
    LlorchClient,
    node_summary,
)

DOCUMENTATION = r"""
module: llorch_nodes_info
short_description: The GPU nodes registered with orchestratord
description:
  - Returns the nodes the llorch registry knows, optionally only those in some states, holding a model, or one
    node by id.
  - Each node comes back as the registry sends it, plus a C(summary) of figures a person or a C(when:) reads
    directly (pools ready, free slots, free VRAM, seconds since the last heartbeat).
extends_documentation_fragment:
  - llorch.kit.llorch
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
attributes:
  check_mode:
    support: full
    description: The module only reads; it runs the same in check mode.
  diff_mode:
    support: none
    description: Nothing to compare; the module changes nothing.
author:
  - llorch-kit contributors
"""

EXAMPLES = r"""
- name: Read the online nodes that hold Llama 3.1 8B
  llorch_nodes_info:
    url: "{{ llorch_controller_url }}"
    token: "{{ llorch_api_token }}"
    status: [online]
    model: meta-llama/Llama-3.1-8B-Instruct
  register: llama_nodes
  no_log: true

- name: Wait until gpu-1 is online again (url and token from LLORCH_URL / LLORCH_API_TOKEN)
  llorch_nodes_info:
    node_id: gpu-1
  register: gpu1
  until: gpu1.nodes | selectattr('status', 'eq', 'online') | list | length == 1
  retries: 30
  delay: 2
"""

RETURN = r"""
count:
  description: How many nodes were returned.
  returned: success
  type: int
  sample: 2
nodes:
  description: The nodes, sorted by node id, each as C(GET /v2/nodes) returns it plus C(summary).
  returned: success
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
      description: Model ids held by the node.
      type: list
      elements: str
      sample: [meta-llama/Llama-3.1-8B-Instruct]
    pools:
      description: Each pool's last reported status.
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
        slots_free:
          description: Free slots over all pools.
          type: int
        slots_busy:
          description: Slots in use over all pools.
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
        slots_free: 7
        slots_busy: 1
        vram_free_bytes: 150323855360
        heartbeat_age_s: 3
"""


def main():
    module = AnsibleModule(
        argument_spec={
            **LLORCH_ARGUMENT_SPEC,
            "node_id": {"type": "str"},
            "status": {"type": "list", "elements": "str", "choices": list(NODE_STATUSES)},
            "model": {"type": "str"},
        },
        supports_check_mode=True,
    )
    client = LlorchClient.from_module(module)
    node_id, statuses, model = (module.params[name] for name in ("node_id", "status", "model"))
    try:
        if node_id:
            node = client.get_node(node_id)
            nodes = [node] if node else []
        else:
            # One status is filtered by the registry; several are filtered here from one answer.
            nodes = client.list_nodes(status=statuses[0] if statuses and len(statuses) == 1 else None)
    except LlorchApiError as exc:
        module.fail_json(msg=str(exc))

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
