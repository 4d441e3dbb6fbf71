# Copyright: llorch-kit contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The connection options shared by the llorch_registry inventory plugin and the llorch_* modules."""

from __future__ import annotations


class ModuleDocFragment:
    # llorch.kit.llorch: the options every llorch module and the inventory plugin take, but url and token.
    # Each of those two has an environment fallback, which only a plugin may declare as `env:` (Ansible
    # resolves a plugin's options from it; validate-modules refuses it in module docs, where the argument
    # spec's fallbacks in module_utils/llorch_api.py read the same variables). So they are documented in
    # two small fragments, MODULE and PLUGIN, that differ only by the env entries: keep them in step.
    DOCUMENTATION = r"""
options:
  token_file:
    description:
      - Path to a file that holds the token, readable by its owner only (mode 0600), not a symbolic link.
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

    # llorch.kit.llorch.module: url and token for the modules.
    MODULE = r"""
options:
  url:
    description:
      - Base URL of orchestratord, the registry, as the Ansible controller reaches it
        (for example C(http://llorch-control:9200)).
      - With several orchestratord replicas, a list of their URLs (or one comma-separated string). A call
        goes to the URL that answered last, the first at the start, and moves to the next only when that URL
        gives no HTTP answer (refused, timed out, cut off, TLS failed). An HTTP answer, an error status
        included, is never retried on another URL. When none answers, the error names every URL and why.
      - Falls back to the E(LLORCH_URL) environment variable (comma-separated for several URLs).
    type: list
    elements: str
  token:
    description:
      - Bearer token for the registry's C(/v2) API.
      - Falls back to the E(LLORCH_API_TOKEN) environment variable.
      - Prefer O(token_file) or the environment over writing the token into a playbook; it is never logged.
    type: str
"""

    # llorch.kit.llorch.plugin: url and token for the inventory plugin, with their env entries.
    PLUGIN = r"""
options:
  url:
    description:
      - Base URL of orchestratord, the registry, as the Ansible controller reaches it
        (for example C(http://llorch-control:9200)).
      - With several orchestratord replicas, a list of their URLs (or one comma-separated string). A call
        goes to the URL that answered last, the first at the start, and moves to the next only when that URL
        gives no HTTP answer (refused, timed out, cut off, TLS failed). An HTTP answer, an error status
        included, is never retried on another URL. When none answers, the error names every URL and why.
      - Falls back to the E(LLORCH_URL) environment variable (comma-separated for several URLs).
    type: list
    elements: str
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
"""
