#!/usr/bin/python
# Copyright: llorch-kit contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: the cluster CA and the certificates it signs, on the controller."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: llorch_certificate
short_description: Create and renew the cluster CA and the certificates it signs
description:
  - Keeps one certificate file and its private key on the controller (run it delegated to
    C(localhost)) - the cluster CA (O(kind=ca), self-signed) or a server or client certificate
    signed by that CA.
  - Issues when the certificate is missing (or its key is, or they do not belong together), is not signed
    by O(ca_path), holds other names than asked, or has fewer than O(renew_before_days) days left;
    otherwise changes nothing. Keys are ECDSA P-256, signatures SHA-256.
  - A renewed CA keeps its key, so the certificates it signed stay valid; a server or client certificate
    gets a new key each time it is issued.
  - Private keys are written 0600 in folders that only their owner may enter (created 0700; a folder open
    to others is refused), every file under a temporary name created without following a link and then
    renamed into place.
  - O(state=info) only reads O(path) and reports its expiry; it never writes.
version_added: "0.1.0"
author: llorch-kit contributors (@llorch-kit)
requirements:
  - cryptography (a dependency of ansible-core, so every controller has it)
options:
  kind:
    description: What the certificate is for.
    type: str
    required: true
    choices: [ca, server, client]
  path:
    description: The certificate file (PEM).
    type: path
    required: true
  private_key_path:
    description: The certificate's private key (PEM, 0600). Required with O(state=present).
    type: path
  ca_path:
    description: The CA certificate that signs a server or client certificate. Required unless O(kind=ca).
    type: path
  ca_private_key_path:
    description: The CA's private key. Required unless O(kind=ca).
    type: path
  common_name:
    description:
      - The subject's common name. Default C(llorch-kit cluster CA) for a CA, else the first of
        O(dns_names), else the first of O(ip_addresses).
    type: str
  dns_names:
    description: DNS names the certificate is for (subject alternative names). Ignored for a CA.
    type: list
    elements: str
    default: []
  ip_addresses:
    description: IP addresses the certificate is for (subject alternative names). Ignored for a CA.
    type: list
    elements: str
    default: []
  valid_days:
    description: Days a new certificate is valid. Default 3650 for a CA, 90 otherwise; never past the CA.
    type: int
  renew_before_days:
    description: Issue again when fewer days than this are left. Must be less than O(valid_days).
    type: int
    default: 30
  state:
    description: C(present) issues when needed; C(info) only reads O(path).
    type: str
    choices: [present, info]
    default: present
attributes:
  check_mode:
    support: full
    description: Reports whether it would issue and why, and writes nothing.
  diff_mode:
    support: none
    description: Certificates are compared by their names, issuer and expiry, reported in RV(reason).
notes:
  - Keep the CA key on the controller only; to keep it in Ansible Vault, encrypt the file and decrypt it
    for the run.
"""

EXAMPLES = r"""
- name: Make the cluster CA once
  llorch.kit.llorch_certificate:
    kind: ca
    path: "{{ llorch_pki_dir }}/ca.crt"
    private_key_path: "{{ llorch_pki_dir }}/ca.key"
  delegate_to: localhost
  run_once: true
  register: cluster_ca

- name: Issue or renew orchestratord's server certificate
  llorch.kit.llorch_certificate:
    kind: server
    path: "{{ llorch_pki_dir }}/{{ inventory_hostname }}/server.crt"
    private_key_path: "{{ llorch_pki_dir }}/{{ inventory_hostname }}/server.key"
    ca_path: "{{ llorch_pki_dir }}/ca.crt"
    ca_private_key_path: "{{ llorch_pki_dir }}/ca.key"
    dns_names: ["{{ inventory_hostname }}", "{{ ansible_fqdn }}"]
    ip_addresses: ["{{ ansible_default_ipv4.address }}"]
  delegate_to: localhost

- name: Days left on the CA
  llorch.kit.llorch_certificate:
    kind: ca
    path: "{{ llorch_pki_dir }}/ca.crt"
    state: info
  delegate_to: localhost
  register: ca_info
"""

RETURN = r"""
changed:
  description: Whether a certificate was (or in check mode would be) issued.
  returned: always
  type: bool
reason:
  description:
    - Why it was issued - C(missing) (no certificate, no key, or they do not belong together),
      C(expiring) (fewer than O(renew_before_days) left), C(names_changed), C(other_ca) (not signed by
      O(ca_path)) - or C(none).
  returned: always
  type: str
  sample: expiring
not_after:
  description: When the certificate expires (ISO 8601, UTC); null when there is none (check mode, info).
  returned: always
  type: str
  sample: "2027-02-25T22:50:00Z"
days_left:
  description: Whole days until RV(not_after); negative once expired.
  returned: always
  type: int
  sample: 89
serial:
  description: The certificate's serial number, hex.
  returned: always
  type: str
  sample: "5f1d0c9a6b2b4f439d2c3a0b3a9c7e11"
sha256:
  description: SHA-256 of the certificate's DER, hex. For O(kind=ca) this is the cluster's CA pin.
  returned: always
  type: str
  sample: "3b9c1f0e8d6a4b2c9e7f5a3d1b0c8e6f4a2d0b9c7e5f3a1d9b7c5e3f1a0d8b6c"
"""

# Ansible modules keep their imports below the documentation strings.
from ansible.module_utils.basic import AnsibleModule, missing_required_lib  # noqa: E402
from ansible_collections.llorch.kit.plugins.module_utils.llorch_pki import (  # noqa: E402
    CRYPTOGRAPHY_IMPORT_ERROR,
    KINDS,
    PkiError,
    ensure_certificate,
)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "kind": {"type": "str", "required": True, "choices": list(KINDS)},
            "path": {"type": "path", "required": True},
            "private_key_path": {"type": "path"},
            "ca_path": {"type": "path"},
            "ca_private_key_path": {"type": "path"},
            "common_name": {"type": "str"},
            "dns_names": {"type": "list", "elements": "str", "default": []},
            "ip_addresses": {"type": "list", "elements": "str", "default": []},
            "valid_days": {"type": "int"},
            "renew_before_days": {"type": "int", "default": 30},
            "state": {"type": "str", "choices": ["present", "info"], "default": "present"},
        },
        required_if=[("state", "present", ("private_key_path",))],
        supports_check_mode=True,
    )
    if CRYPTOGRAPHY_IMPORT_ERROR is not None:
        module.fail_json(msg=missing_required_lib("cryptography"), exception=CRYPTOGRAPHY_IMPORT_ERROR)
    try:
        result = ensure_certificate(module.params, module.check_mode)
    except (PkiError, OSError) as exc:
        module.fail_json(msg=f"{module.params['path']}: {exc}")
    module.exit_json(**result)


if __name__ == "__main__":
    main()
