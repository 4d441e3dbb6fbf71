#!/usr/bin/python
# Copyright: llorch-kit contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: llorch_catalog_info
short_description: Which models the cluster can serve, and where
description:
  - Returns the llorch registry's model catalog. C(models) is the per-model view (C(GET /v2/catalog/models))
    telling where each model is staged (nodes, replicas) and where it is served (its engines and their
    states, the pools serving it now and their free slots), so a model served can be told from one merely
    staged.
  - C(replicated_models), C(single_node_models), C(total_models) and C(availability) come from
    C(GET /v2/catalog/availability), counted per online node.
extends_documentation_fragment:
  - llorch.kit.llorch
  - llorch.kit.llorch.module
options:
  model:
    description:
      - Return only this model in C(models); the other keys stay cluster-wide.
    type: str
attributes:
  check_mode:
    support: full
    description: The module only reads; it runs the same in check mode.
  diff_mode:
    support: none
    description: Nothing to compare; the module changes nothing.
author:
  - llorch-kit contributors (@llorch-kit)
"""

EXAMPLES = r"""
- name: Read the catalog
  llorch_catalog_info:
    url: "{{ llorch_controller_url }}"
    token: "{{ llorch_api_token }}"
  register: catalog
  no_log: true

- name: Every model is served by at least two nodes
  ansible.builtin.assert:
    that: catalog.single_node_models | length == 0
    fail_msg: "held by one node only: {{ catalog.single_node_models | join(', ') }}"
"""

RETURN = r"""
models:
  description: One entry per model held by an online node, sorted by model id.
  returned: success
  type: list
  elements: dict
  contains:
    model_id:
      description: The model's id.
      type: str
    nodes:
      description: Ids of the online nodes where it is staged.
      type: list
      elements: str
    replicas:
      description: How many online nodes stage it.
      type: int
    pools_ready:
      description: Pools whose engine serves it now (engine ready or busy, pool ready and not draining).
      type: int
    slots_free:
      description: Free slots in those pools.
      type: int
    served:
      description: Whether at least one engine serves it now; false when it is only staged (or loading).
      type: bool
    engines:
      description:
        - Every engine on an online node set up to serve it, in any state, by node and pool.
        - Each with C(node_id), C(pool_id), C(kind), C(state), C(url) and C(serving) (it serves now).
      type: list
      elements: dict
  sample:
    - model_id: meta-llama/Llama-3.1-8B-Instruct
      nodes: [gpu-1, gpu-2]
      replicas: 2
      pools_ready: 1
      slots_free: 3
      served: true
      engines:
        - {node_id: gpu-1, pool_id: pool-0, kind: llama.cpp, state: ready, url: "http://10.0.0.11:8101",
           serving: true}
        - {node_id: gpu-2, pool_id: pool-0, kind: llama.cpp, state: loading, url: "http://10.0.0.12:8101",
           serving: false}
total_models:
  description: How many distinct models online nodes hold.
  returned: success
  type: int
  sample: 3
replicated_models:
  description: Models held by two or more online nodes.
  returned: success
  type: list
  elements: str
  sample: [meta-llama/Llama-3.1-8B-Instruct]
single_node_models:
  description: Models held by exactly one online node.
  returned: success
  type: list
  elements: str
  sample: [Qwen/Qwen2.5-7B-Instruct]
availability:
  description:
    - Per node id, whether it is online, which models its pools hold and serve, and each pool's engine
      (the registry's C(nodes) map).
  returned: success
  type: dict
  sample:
    gpu-1:
      node_id: gpu-1
      address: http://10.0.0.11:8080
      online: true
      models: [meta-llama/Llama-3.1-8B-Instruct]
      served: []
      pools: [{pool_id: pool-0, ready: true, models: [meta-llama/Llama-3.1-8B-Instruct], engine: null}]
"""

# Below the documentation blocks, where ansible-test's validate-modules wants imports.
from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.llorch.kit.plugins.module_utils.llorch_api import (  # noqa: E402
    LLORCH_ARGUMENT_SPEC,
    LlorchApiError,
    LlorchClient,
)


def main():
    module = AnsibleModule(
        argument_spec={**LLORCH_ARGUMENT_SPEC, "model": {"type": "str"}},
        supports_check_mode=True,
    )
    client = LlorchClient.from_module(module)
    try:
        models = client.catalog_models()
        availability = client.catalog_availability() or {}
    except LlorchApiError as exc:
        module.fail_json(msg=str(exc))

    wanted = module.params["model"]
    if wanted:
        models = [entry for entry in models if entry.get("model_id") == wanted]
    module.exit_json(
        changed=False,
        models=sorted(models, key=lambda entry: entry.get("model_id", "")),
        total_models=availability.get("total_models", 0),
        replicated_models=availability.get("replicated_models", []),
        single_node_models=availability.get("single_node_models", []),
        availability=availability.get("nodes", {}),
    )


if __name__ == "__main__":
    main()
