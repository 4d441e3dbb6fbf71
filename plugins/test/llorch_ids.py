# Copyright: llorch-kit contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Jinja tests for the kit's ids and engine kinds, so that roles check them with the contract's rule, not a
copied regex or list."""

from __future__ import annotations

from ansible_collections.llorch.kit.plugins.module_utils.llorch_contract import (
    ENGINE_KINDS,
    valid_id,
    valid_model_id,
    valid_node_id,
)


def valid_engine_kind(value: object) -> bool:
    """An engine kind pool-managerd has an adapter for (the contract's ENGINE_KINDS)."""
    return isinstance(value, str) and value in ENGINE_KINDS


class TestModule:
    def tests(self):
        return {
            "llorch_id": valid_id,
            "llorch_node_id": valid_node_id,
            "llorch_model_id": valid_model_id,
            "llorch_engine_kind": valid_engine_kind,
        }
