# Copyright: llorch-kit contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Jinja tests for the kit's ids, so that roles check them with the contract's rule, not a copied regex."""

from __future__ import annotations

from ansible_collections.llorch.kit.plugins.module_utils.llorch_contract import valid_id, valid_model_id


class TestModule:
    def tests(self):
        return {"llorch_id": valid_id, "llorch_model_id": valid_model_id}
