#!/usr/bin/python
# Copyright: llorch-kit contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: the controller's side of a CA rotation (a next CA, the overlap bundle, the promotion)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: llorch_certificate_rotation
short_description: Move the cluster to a new CA on the controller, with an overlap of old and new
description:
  - The controller's steps of C(playbooks/rotate_credentials.yml) (docs/tls.md, Rotation). Run it with
    C(delegate_to) C(localhost).
  - O(state=overlap) makes the next CA once, in C(<pki_dir>/next/) (C(ca.crt) 0644, C(ca.key) 0600, the
    folder 0700), with the current CA's common name, and writes C(<pki_dir>/next/bundle.crt) - the current
    CA then the next one, what every host trusts while certificates move from one to the other. A second
    run changes nothing.
  - O(state=promoted) makes the next CA the cluster CA (C(ca.crt), C(ca.key)). The current CA's certificate
    is kept, dated, under C(<pki_dir>/retired/); its key is deleted (vault-encrypted or not), because once
    no host trusts that CA it can sign nothing anyone accepts, and a key kept is a key that can leak. The
    new C(ca.key) is written in clear (0600); encrypt it with ansible-vault afterwards if you keep it so.
  - Every file is replaced by rename, in an order that lets a run stopped anywhere finish when run again;
    an O(state=overlap) run that finds a promotion stopped half-way finishes it and reports
    RV(finished_previous).
version_added: "0.1.0"
author: llorch-kit contributors (@llorch-kit)
requirements:
  - cryptography (a dependency of ansible-core, so every controller has it)
options:
  pki_dir:
    description: The controller's PKI folder (role llorch_pki's C(llorch_pki_dir)).
    type: path
    required: true
  state:
    description: Which step.
    type: str
    choices: [overlap, promoted]
    required: true
  common_name:
    description: The next CA's common name; keep the role's C(llorch_pki_ca_common_name).
    type: str
    default: llorch-kit cluster CA
  valid_days:
    description: How long the next CA lives.
    type: int
    default: 3650
attributes:
  check_mode:
    support: full
    description: Reports what would be made or moved and writes nothing.
  diff_mode:
    support: none
    description: Certificates are compared by the module itself.
"""

EXAMPLES = r"""
- name: Make the next CA beside the current one, and the bundle of both
  llorch.kit.llorch_certificate_rotation:
    pki_dir: "{{ llorch_pki_dir }}"
    state: overlap
  register: ca_overlap
  delegate_to: localhost
  run_once: true

- name: Make the next CA the cluster CA (once every host trusts it alone)
  llorch.kit.llorch_certificate_rotation:
    pki_dir: "{{ llorch_pki_dir }}"
    state: promoted
  delegate_to: localhost
  run_once: true
"""

RETURN = r"""
bundle:
  description: The PEM of the current CA then the next one (public), with O(state=overlap).
  returned: with O(state=overlap), once the next CA exists
  type: str
bundle_path:
  description: Where the bundle is on the controller.
  returned: always
  type: str
next_ca_path:
  description: The next CA's certificate on the controller; next_ca_private_key_path is its key.
  returned: always
  type: str
current_sha256:
  description: The pin of the CA in C(ca.crt) now.
  returned: with O(state=overlap)
  type: str
next_sha256:
  description: The pin of the next CA (what new join tokens carry once it is promoted).
  returned: with O(state=overlap), once the next CA exists
  type: str
finished_previous:
  description: An earlier promotion had stopped half-way and was finished; nothing else was done.
  returned: with O(state=overlap)
  type: bool
sha256:
  description: The pin of the cluster CA after the promotion.
  returned: with O(state=promoted)
  type: str
retired:
  description: Where the previous CA's certificate was kept (null when nothing was promoted).
  returned: with O(state=promoted)
  type: str
"""

# Below the documentation blocks, where ansible-test's validate-modules wants imports.
from ansible.module_utils.basic import AnsibleModule, missing_required_lib  # noqa: E402
from ansible_collections.llorch.kit.plugins.module_utils.llorch_pki import (  # noqa: E402
    CRYPTOGRAPHY_IMPORT_ERROR,
    PkiError,
    ca_overlap,
    ca_promote,
)


def main():
    module = AnsibleModule(
        argument_spec={
            "pki_dir": {"type": "path", "required": True},
            "state": {"type": "str", "choices": ["overlap", "promoted"], "required": True},
            "common_name": {"type": "str", "default": "llorch-kit cluster CA"},
            "valid_days": {"type": "int", "default": 3650},
        },
        supports_check_mode=True,
    )
    if CRYPTOGRAPHY_IMPORT_ERROR:
        module.fail_json(msg=missing_required_lib("cryptography"), exception=CRYPTOGRAPHY_IMPORT_ERROR)
    params = module.params
    try:
        if params["state"] == "overlap":
            result = ca_overlap(
                params["pki_dir"], params["valid_days"], params["common_name"], module.check_mode
            )
        else:
            result = ca_promote(params["pki_dir"], module.check_mode)
    except (PkiError, OSError) as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
