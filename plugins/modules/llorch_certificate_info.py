#!/usr/bin/python
# Copyright: llorch-kit contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: how long a certificate of the cluster has left, read on the controller."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: llorch_certificate_info
short_description: Read a cluster certificate's expiry and names, never writing
description:
  - Reads one certificate file (PEM) on the controller (run it delegated to C(localhost)) and reports when
    it expires, its fingerprint and whether M(llorch.kit.llorch_certificate) would issue it again.
  - Compares only the names given in O(common_name), O(dns_names) and O(ip_addresses), so a status check
    can ask whether a certificate still holds a name without restating all of them.
version_added: "0.1.0"
author: llorch-kit contributors (@llorch-kit)
requirements:
  - cryptography (a dependency of ansible-core, so every controller has it)
options:
  kind:
    description: What the certificate is for; a CA's default common name is compared when O(kind=ca).
    type: str
    default: server
    choices: [ca, server, client]
  path:
    description: The certificate file (PEM). A missing file is reported, not an error.
    type: path
    required: true
  common_name:
    description: The subject's common name to compare, if any.
    type: str
  dns_names:
    description: DNS names the certificate must hold.
    type: list
    elements: str
    default: []
  ip_addresses:
    description: IP addresses the certificate must hold.
    type: list
    elements: str
    default: []
  renew_before_days:
    description: Report RV(reason=expiring) when fewer days than this are left.
    type: int
    default: 30
attributes:
  check_mode:
    support: full
    description: The module only reads; it runs the same in check mode.
  diff_mode:
    support: none
    description: Nothing to compare; the module changes nothing.
seealso:
  - module: llorch.kit.llorch_certificate
"""

EXAMPLES = r"""
- name: Days left on the cluster CA
  llorch.kit.llorch_certificate_info:
    kind: ca
    path: "{{ llorch_pki_dir }}/ca.crt"
  delegate_to: localhost
  register: ca_info

- name: Warn three weeks before the server certificate expires
  ansible.builtin.debug:
    msg: "{{ server_info.days_left }} days left on {{ inventory_hostname }}'s certificate"
  when: server_info.days_left is not none and server_info.days_left < 21
"""

RETURN = r"""
exists:
  description: Whether O(path) holds a certificate.
  returned: always
  type: bool
reason:
  description:
    - What M(llorch.kit.llorch_certificate) would issue it for - C(missing), C(expiring),
      C(names_changed) - or C(none).
  returned: always
  type: str
  sample: none
not_after:
  description: When the certificate expires (ISO 8601, UTC); null when there is none.
  returned: always
  type: str
  sample: "2027-02-25T22:50:00Z"
days_left:
  description: Whole days until RV(not_after), negative once expired; null when there is none.
  returned: always
  type: int
  sample: 89
serial:
  description: The certificate's serial number, hex; null when there is none.
  returned: always
  type: str
sha256:
  description: SHA-256 of the certificate's DER, hex; for a CA this is the cluster's CA pin.
  returned: always
  type: str
"""

# Ansible modules keep their imports below the documentation strings.
from ansible.module_utils.basic import AnsibleModule, missing_required_lib  # noqa: E402
from ansible_collections.llorch.kit.plugins.module_utils.llorch_pki import (  # noqa: E402
    CRYPTOGRAPHY_IMPORT_ERROR,
    KINDS,
    PkiError,
    certificate_info,
)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "kind": {"type": "str", "default": "server", "choices": list(KINDS)},
            "path": {"type": "path", "required": True},
            "common_name": {"type": "str"},
            "dns_names": {"type": "list", "elements": "str", "default": []},
            "ip_addresses": {"type": "list", "elements": "str", "default": []},
            "renew_before_days": {"type": "int", "default": 30},
        },
        supports_check_mode=True,
    )
    if CRYPTOGRAPHY_IMPORT_ERROR is not None:
        module.fail_json(msg=missing_required_lib("cryptography"), exception=CRYPTOGRAPHY_IMPORT_ERROR)
    try:
        result = certificate_info(module.params)
    except (PkiError, OSError) as exc:
        module.fail_json(msg=f"{module.params['path']}: {exc}")
    module.exit_json(**result)


if __name__ == "__main__":
    main()
