#!/usr/bin/python
# Copyright: llorch-kit contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: llorch_node_credential
short_description: Rotate one GPU node's own credentials on the llorch control plane, without downtime
description:
  - Two steps of C(playbooks/rotate_credentials.yml), one node at a time (docs/credentials.md, Rotation).
  - O(state=rotating) asks orchestratord to rotate the node (C(POST /v2/nodes/<node_id>/credential/rotate))
    - its node token is renewed at its next heartbeat (the answer carries the new one, the agent stores it,
    the current one becomes C(node/<node_id>/old)), and its single-use recovery credential is replaced at
    once. The new recovery secret is returned this once as RV(recovery_token), for the play to write to
    the node's credential folder.
  - "B(Run O(state=rotating) with C(no_log: true)): the secret is a return value."
  - O(state=switched) waits until the node has heartbeated with a node token issued at or after O(since)
    (the daemon's C(last_used_at)), then revokes C(node/<node_id>/old). A node that does not switch within
    O(timeout_s) fails the task with the node named; nothing is revoked then, and the agent keeps working
    with its previous token until that one's expiry.
  - The call needs an admin credential.
extends_documentation_fragment:
  - llorch.kit.llorch
  - llorch.kit.llorch.module
options:
  node_id:
    description: The node whose credentials are rotated.
    type: str
    required: true
  state:
    description: Which step (see the description).
    type: str
    choices: [rotating, switched]
    required: true
  since:
    description:
      - With O(state=switched), the RV(asked_at) of the O(state=rotating) step (RFC 3339 UTC); a node token
        issued before it does not count.
    type: str
  timeout_s:
    description: With O(state=switched), how long to wait for the node's heartbeat with its new token.
    type: int
    default: 60
attributes:
  check_mode:
    support: full
    description: Says what would be asked or revoked, without calling the daemon's changing routes.
  diff_mode:
    support: none
    description: Nothing worth a diff.
author:
  - llorch-kit contributors (@llorch-kit)
"""

EXAMPLES = r"""
- name: Ask for the rotation of gpu-7's credentials
  llorch.kit.llorch_node_credential:
    node_id: gpu-7
    state: rotating
  register: rotation
  delegate_to: localhost
  no_log: true

- name: Wait until gpu-7 heartbeats with its new token, then revoke the previous one
  llorch.kit.llorch_node_credential:
    node_id: gpu-7
    state: switched
    since: "{{ rotation.asked_at }}"
    timeout_s: 60
  delegate_to: localhost
"""

RETURN = r"""
recovery_token:
  description: The node's new recovery secret (single use), shown this once. Run the task with C(no_log).
  returned: with O(state=rotating), when not in check mode
  type: str
  sample: llv_...
asked_at:
  description: When the rotation was asked (RFC 3339 UTC), for O(since).
  returned: with O(state=rotating)
  type: str
  sample: "2026-11-28T02:10:00Z"
credential:
  description: The node's current credential as the daemon lists it, without secret.
  returned: with O(state=switched)
  type: dict
  sample: {name: node/gpu-7, scope: node, node_id: gpu-7, last_used_at: "2026-11-28T02:10:01Z"}
waited_s:
  description: Seconds waited for the node's heartbeat with its new token.
  returned: with O(state=switched)
  type: float
  sample: 0.4
"""

import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402

# Below the documentation blocks, where ansible-test's validate-modules wants imports.
from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.llorch.kit.plugins.module_utils.llorch_api import (  # noqa: E402
    LLORCH_ARGUMENT_SPEC,
    LlorchApiError,
    LlorchClient,
)

POLL_S = 0.25


def _time(text) -> float | None:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()  # noqa: UP017
    except (TypeError, ValueError):
        return None


def _now_text() -> str:
    # Whole seconds, floored: the daemon's created_at of a token issued in this second is not before it.
    return datetime.fromtimestamp(int(time.time()), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: UP017


def switched(credentials: list, node_id: str, since: float) -> dict | None:
    """The node's current credential once it was issued at or after `since` and a heartbeat used it."""
    current = next((c for c in credentials if c.get("name") == f"node/{node_id}"), None)
    if current is None:
        return None
    issued, used = _time(current.get("created_at")), _time(current.get("last_used_at"))
    if issued is None or used is None or issued < since or used < issued:
        return None
    return current


def rotate(module, client, node_id: str) -> dict:
    result = {"changed": True, "asked_at": _now_text()}
    if not module.check_mode:
        answer = client.request("POST", f"/v2/nodes/{node_id}/credential/rotate")
        if not isinstance(answer, dict) or not isinstance(answer.get("secret"), str):
            raise LlorchApiError(f"the registry at {client.url} answered the rotation without a secret")
        result["recovery_token"] = answer["secret"]
    return result


def wait_and_revoke(module, client, node_id: str, since_text: str, timeout_s: int) -> dict:
    since = _time(since_text)
    if since is None:
        module.fail_json(msg=f"since must be an RFC 3339 UTC time like 2026-11-28T02:10:00Z: {since_text!r}")
    started = time.monotonic()
    while True:
        credentials = client.list_credentials()
        current = switched(credentials, node_id, since)
        if current is not None or module.check_mode:
            break
        if time.monotonic() - started > timeout_s:
            module.fail_json(
                msg=f"node {node_id} did not heartbeat with a node token issued since {since_text} within "
                f"{timeout_s} s (is its agent running and online?); node/{node_id}/old was not revoked: "
                "run the playbook again for this node (--limit) once it is online",
                changed=False,
            )
        time.sleep(POLL_S)
    old = f"node/{node_id}/old"
    had_old = any(c.get("name") == old for c in credentials)
    changed = had_old if module.check_mode else client.delete_credential(old)
    return {
        "changed": changed,
        "credential": current or {},
        "waited_s": round(time.monotonic() - started, 3),
    }


def main():
    module = AnsibleModule(
        argument_spec={
            **LLORCH_ARGUMENT_SPEC,
            "node_id": {"type": "str", "required": True},
            "state": {"type": "str", "choices": ["rotating", "switched"], "required": True},
            "since": {"type": "str"},
            "timeout_s": {"type": "int", "default": 60},
        },
        required_if=[("state", "switched", ["since"])],
        supports_check_mode=True,
    )
    client = LlorchClient.from_module(module)
    params = module.params
    try:
        if params["state"] == "rotating":
            result = rotate(module, client, params["node_id"])
        else:
            result = wait_and_revoke(module, client, params["node_id"], params["since"], params["timeout_s"])
    except LlorchApiError as exc:
        module.fail_json(msg=str(exc), changed=False)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
