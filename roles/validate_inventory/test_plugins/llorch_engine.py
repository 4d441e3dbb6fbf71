# Copyright: llorch-kit contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Jinja test for an engine kind: the inventory check takes the kinds from the contract, no copied list."""

from __future__ import annotations

from ansible_collections.llorch.kit.plugins.module_utils.llorch_contract import ENGINE_KINDS


def llorch_engine_kind(value: object) -> bool:
    return isinstance(value, str) and value in ENGINE_KINDS


class TestModule:
    def tests(self):
        return {"llorch_engine_kind": llorch_engine_kind}
