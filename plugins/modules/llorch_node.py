#!/usr/bin/python
# Copyright: llorch-kit contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: llorch_node
short_description: Drain, undrain or remove a node in the llorch registry
description:
  - Sets a registered node's place in the llorch registry (orchestratord).
  - C(drained) asks the registry to stop placing work on the node; with O(wait) the module then waits until
    the node's pools report no busy slots, that is until the requests in flight on its engines have
    finished (each pool's engine reports its busy slots to pool-managerd, which reports them at each
    heartbeat). A pool whose engine is loading or dead has nothing in flight and never holds up the wait.
  - C(present) undrains a drained node; with O(wait) the module then waits until the node is online. It cannot
    create one, because nodes join the registry themselves when
    their pool-managerd starts.
  - C(absent) removes the node's record. A node whose agent still runs registers again at its next heartbeat;
    stop pool-managerd first to remove a node for good.
extends_documentation_fragment:
  - llorch.kit.llorch
  - llorch.kit.llorch.module
options:
  node_id:
    description: The node's id in the registry.
    type: str
    required: true
  state:
    description: What the node should be.
    type: str
    choices: [present, drained, absent]
    default: present
  wait:
    description:
      - With O(state=drained), wait until every pool reports C(slots_free == slots_total), so that no request
        is in flight on its engine. Requests already running finish; placement sends no new ones meanwhile.
        Pools whose engine is C(loading) or C(dead) count as idle.
      - With O(state=present), wait until the node is C(online), the way a restarted or undrained node comes
        back at its agent's next heartbeat (an agent that registers again after a restart is waited for too).
      - Fail if O(wait_timeout) runs out first. Ignored for O(state=absent) and in check mode.
    type: bool
    default: false
  wait_timeout:
    description: Seconds to wait for the node to become idle (drained) or online (present).
    type: int
    default: 300
attributes:
  check_mode:
    support: full
    description: Reports what would change without calling the registry's write routes, and does not wait.
  diff_mode:
    support: full
    description: Shows the node's state (present, drained, absent) before and after.
author:
  - llorch-kit contributors (@llorch-kit)
"""

EXAMPLES = r"""
- name: Drain gpu-3 and wait up to ten minutes for its requests to finish
  llorch.kit.llorch_node:
    url: "{{ llorch_controller_url }}"
    token: "{{ llorch_api_token }}"
    node_id: gpu-3
    state: drained
    wait: true
    wait_timeout: 600
  no_log: true

- name: Put gpu-3 back into service and wait until it is online (url and token from the environment)
  llorch.kit.llorch_node:
    node_id: gpu-3
    state: present
    wait: true
    wait_timeout: 120

- name: Forget gpu-3 after its agent was stopped
  llorch.kit.llorch_node:
    node_id: gpu-3
    state: absent
"""

RETURN = r"""
status:
  description:
    - The registry's HTTP status when it refused the call (403 for a credential whose scope does not
      allow it).
  returned: failure
  type: int
  sample: 403
node:
  description:
    - The node's registry record after the change (what it would be, in check mode); empty when absent.
  returned: success
  type: dict
  sample:
    node_id: gpu-3
    status: draining
    address: http://10.0.0.13:8080
    models: [meta-llama/Llama-3.1-8B-Instruct]
busy_slots:
  description:
    - Slots with a request in flight over the node's pools, as its last heartbeat reported them (pools whose
      engine is loading or dead count none).
  returned: success, when the node exists after the change
  type: int
  sample: 0
state_before:
  description: What the node was before the module ran.
  returned: success
  type: str
  sample: present
"""

# Below the documentation blocks, where ansible-test's validate-modules wants imports.
import time  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.llorch.kit.plugins.module_utils.llorch_api import (  # noqa: E402
    LLORCH_ARGUMENT_SPEC,
    POLL_INTERVAL_S,
    LlorchApiError,
    LlorchClient,
    busy_slots,
    is_drained,
    wait_for_node,
)

ONLINE = "online"


def node_state(node: dict | None) -> str:
    if node is None:
        return "absent"
    return "drained" if is_drained(node) else "present"


def wait_until_idle(client: LlorchClient, node_id: str, node: dict, timeout_s: int) -> dict:
    """Re-read the node until its pools report no busy slots; raise when `timeout_s` runs out."""
    deadline = time.monotonic() + timeout_s
    while busy_slots(node) > 0:
        if time.monotonic() >= deadline:
            raise LlorchApiError(
                f"node {node_id} still had {busy_slots(node)} busy slot(s) after {timeout_s} s of waiting "
                f"for it to drain (status {node.get('status')}); it stays drained"
            )
        time.sleep(min(POLL_INTERVAL_S, max(deadline - time.monotonic(), 0)))
        node = client.get_node(node_id)
        if node is None:
            raise LlorchApiError(f"node {node_id} left the registry at {client.url} while draining")
    return node


def wait_until_online(client: LlorchClient, node_id: str, timeout_s: int) -> dict:
    """Re-read the node until it is online; raise with what was last seen once `timeout_s` runs out."""
    node, online = wait_for_node(client, node_id, lambda node: node.get("status") == ONLINE, timeout_s)
    if not online:
        seen = f"status {node.get('status')}" if node else "the registry does not know it"
        raise LlorchApiError(
            f"node {node_id} was not online at {client.url} after {timeout_s} s of waiting; last seen: {seen}"
        )
    return node


def main():
    module = AnsibleModule(
        argument_spec={
            **LLORCH_ARGUMENT_SPEC,
            "node_id": {"type": "str", "required": True},
            "state": {"type": "str", "choices": ["present", "drained", "absent"], "default": "present"},
            "wait": {"type": "bool", "default": False},
            "wait_timeout": {"type": "int", "default": 300},
        },
        supports_check_mode=True,
    )
    client = LlorchClient.from_module(module)
    node_id, wanted = module.params["node_id"], module.params["state"]
    result = {"changed": False}
    try:
        node = client.get_node(node_id)
        before = node_state(node)
        result["state_before"] = before
        if wanted != "absent" and node is None:
            module.fail_json(
                msg=f"node {node_id} is not registered with {client.url}; nodes join the registry "
                "themselves when their pool-managerd starts",
                **result,
            )
        result["changed"] = before != wanted
        if result["changed"] and not module.check_mode:
            if wanted == "absent":
                # False when the node left between the read above and this delete (another task or an
                # operator removed it; the registry answered 404): then this task changed nothing.
                result["changed"] = client.delete_node(node_id)
                node = None
            else:
                node = client.set_drain(node_id, wanted == "drained")
        elif result["changed"]:
            node = None if wanted == "absent" else expected_node(node, wanted)
        if module.params["wait"] and not module.check_mode:
            if wanted == "drained":
                node = wait_until_idle(client, node_id, node, module.params["wait_timeout"])
            elif wanted == "present":
                node = wait_until_online(client, node_id, module.params["wait_timeout"])
    except LlorchApiError as exc:
        message = str(exc)
        if exc.status == 403:
            # The daemon says which credential and what it may do; say which one this needs.
            message += (
                "; draining, undraining and deleting nodes need an operator credential "
                "(llorch_operator_token_file)"
            )
        module.fail_json(msg=message, status=exc.status, **result)

    result["node"] = node or {}
    if node is not None:
        result["busy_slots"] = busy_slots(node)
    if module._diff:
        result["diff"] = {
            "before": {"node_id": node_id, "state": before},
            "after": {"node_id": node_id, "state": wanted},
        }
    module.exit_json(**result)


def expected_node(node: dict, wanted: str) -> dict:
    """The record the registry would return after a drain or undrain (what check mode reports)."""
    drain = wanted == "drained"
    expected = {**node, "drain": drain} if "drain" in node else dict(node)
    if drain:
        expected["status"] = "draining"
    elif node.get("status") == "draining":
        expected["status"] = "online"
    return expected


if __name__ == "__main__":
    main()
