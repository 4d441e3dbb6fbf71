#!/usr/bin/python
# Copyright: llorch-kit contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: llorch_credential
short_description: Issue or revoke a scoped credential of the llorch control plane
description:
  - Issues a named credential on orchestratord's C(/v2/credentials) (O(state=present)) or revokes one
    (O(state=absent)). The call needs an admin credential (the cluster's C(token_file) token is one).
  - The daemon shows a new credential's secret once, in the answer that made it, and stores only its digest.
    This module returns it as RV(secret) only on the run that issued it; a later run finds the name and
    changes nothing, and cannot return the secret again (revoke it and issue a new one to get another).
  - "B(Put C(no_log: true) on every task that runs this module with O(state=present)):
    the secret is a return value, and Ansible hides return values only on a C(no_log) task."
  - A credential is never changed in place. A name held by a credential of another O(scope) or O(node_id)
    is an error; O(ttl_s) and O(uses) are used only when the credential is issued.
  - Joining a GPU node with a join credential is described in docs/credentials.md; role C(pool_managerd)
    does it with this module.
extends_documentation_fragment:
  - llorch.kit.llorch
  - llorch.kit.llorch.module
options:
  name:
    description:
      - The credential's name, unique in the daemon (letters, digits, C(.), C(_), C(-); 1-128).
      - With O(state=absent) also a node's own credential, C(node/<node_id>).
    type: str
    required: true
  state:
    description: Whether the credential should exist.
    type: str
    choices: [present, absent]
    default: present
  scope:
    description:
      - What the credential may do (docs/credentials.md); needed with O(state=present).
      - C(join) buys a GPU node its own node credential, once per use; C(reader) reads C(/v2); C(operator)
        also drains, undrains and deletes nodes.
    type: str
    choices: [join, reader, operator]
  node_id:
    description: With O(scope=join), bind the credential to this node id (it may join that node only).
    type: str
  ttl_s:
    description:
      - Seconds the credential lives. Unset, a join credential lives 3600 s (at most 7 days) and the others
        never expire.
    type: int
  uses:
    description: With O(scope=join), how many joins it allows (the daemon's default is 1).
    type: int
attributes:
  check_mode:
    support: full
    description: Reports whether a credential would be issued or revoked, without doing it (no secret then).
  diff_mode:
    support: none
    description: Credentials have no state worth a diff; RV(credential) shows what the daemon holds.
author:
  - llorch-kit contributors (@llorch-kit)
"""

EXAMPLES = r"""
- name: Issue a join credential for gpu-7, one use within an hour
  llorch.kit.llorch_credential:
    url: "{{ llorch_controller_url }}"
    token: "{{ llorch_api_token }}"
    ca_path: "{{ llorch_pki_dir }}/ca.crt"
    name: join-gpu-7
    scope: join
    node_id: gpu-7
    ttl_s: 3600
    uses: 1
  register: join_credential
  delegate_to: localhost
  # The secret is a return value: only a no_log task keeps it out of the output and the logs.
  no_log: true

- name: A reader credential for the dashboards
  llorch.kit.llorch_credential:
    name: dashboards
    scope: reader
  register: dashboards
  no_log: true

- name: Revoke it (effective at once)
  llorch.kit.llorch_credential:
    name: dashboards
    state: absent
"""

RETURN = r"""
credential:
  description:
    - The credential as the daemon lists it, without its secret; empty when absent. In check mode, what
      would be issued.
  returned: success
  type: dict
  sample:
    name: join-gpu-7
    scope: join
    node_id: gpu-7
    expires_at: "2026-11-28T01:00:00Z"
    uses_left: 1
    usable: true
secret:
  description:
    - "The new credential's secret, shown this once by the daemon. Run the task with C(no_log: true)."
  returned: when a credential was issued (not in check mode, not when the name already existed)
  type: str
  sample: llj_...
state_before:
  description: Whether the credential existed before the module ran (present or absent).
  returned: success
  type: str
  sample: absent
"""

# Below the documentation blocks, where ansible-test's validate-modules wants imports.
from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.llorch.kit.plugins.module_utils.llorch_api import (  # noqa: E402
    LLORCH_ARGUMENT_SPEC,
    LlorchApiError,
    LlorchClient,
)


def issue_body(params: dict) -> dict:
    """POST /v2/credentials body: only what was set (the daemon refuses fields a scope does not take)."""
    body = {"name": params["name"], "scope": params["scope"]}
    for option in ("ttl_s", "uses", "node_id"):
        if params[option] is not None:
            body[option] = params[option]
    return body


def conflict(existing: dict, params: dict) -> str | None:
    """Why an existing credential of that name is not the one asked for; None when it is."""
    for option in ("scope", "node_id"):
        if params[option] is not None and existing.get(option) != params[option]:
            return (
                f"credential {params['name']} exists with {option} {existing.get(option)!r}, not "
                f"{params[option]!r}; credentials are never changed in place: revoke it (state: absent) first"
            )
    return None


def main():
    module = AnsibleModule(
        argument_spec={
            **LLORCH_ARGUMENT_SPEC,
            "name": {"type": "str", "required": True},
            "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
            "scope": {"type": "str", "choices": ["join", "reader", "operator"]},
            "node_id": {"type": "str"},
            "ttl_s": {"type": "int"},
            "uses": {"type": "int"},
        },
        required_if=[("state", "present", ["scope"])],
        supports_check_mode=True,
    )
    client = LlorchClient.from_module(module)
    params = module.params
    result = {"changed": False, "credential": {}}
    try:
        existing = client.get_credential(params["name"])
        result["state_before"] = "absent" if existing is None else "present"
        if params["state"] == "absent":
            result["changed"] = existing is not None
            if existing is not None and not module.check_mode:
                # False when it went between the read and the delete: then this task changed nothing.
                result["changed"] = client.delete_credential(params["name"])
        elif existing is not None:
            problem = conflict(existing, params)
            if problem:
                module.fail_json(msg=problem, **result)
            result["credential"] = existing
        elif module.check_mode:
            result.update(changed=True, credential=issue_body(params))
        else:
            issued = client.create_credential(issue_body(params))
            result.update(changed=True, secret=issued.get("secret"))
            # The listing's view (uses_left, node_id, usable), which the issuing answer does not hold.
            result["credential"] = client.get_credential(params["name"]) or {
                key: value for key, value in issued.items() if key != "secret"
            }
    except LlorchApiError as exc:
        module.fail_json(msg=str(exc), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
