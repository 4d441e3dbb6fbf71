# Copyright: llorch-kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The connection options shared by the llorch_registry inventory plugin and the llorch_* modules."""

from __future__ import annotations


class ModuleDocFragment:
    # The env entries drive the inventory plugin's option resolution; the modules read the same
    # variables through the argument spec's fallbacks in module_utils/llorch_api.py.
    DOCUMENTATION = r"""
options:
  url:
    description:
      - Base URL of orchestratord, the registry, as the Ansible controller reaches it
        (for example C(http://llorch-control:9200)).
      - Falls back to the E(LLORCH_URL) environment variable.
    type: str
    env:
      - name: LLORCH_URL
  token:
    description:
      - Bearer token for the registry's C(/v2) API.
      - Falls back to the E(LLORCH_API_TOKEN) environment variable.
      - Prefer O(token_file) or the environment over writing the token into a playbook; it is never logged.
    type: str
    env:
      - name: LLORCH_API_TOKEN
  token_file:
    description:
      - Path to a file (mode 0600) that holds the token.
      - When set, it wins over O(token) and E(LLORCH_API_TOKEN).
    type: path
  validate_certs:
    description:
      - Verify the registry's TLS certificate when O(url) is C(https://).
    type: bool
    default: true
  ca_path:
    description:
      - PEM file of the CA certificates that signed the registry's certificate.
    type: path
  timeout:
    description:
      - Seconds to wait for each answer from the registry.
    type: int
    default: 10
notes:
  - Errors name the registry URL and what failed (for example
    C(token rejected by http://ctl:9200 (401))) and never contain the token.
"""
