"""The plain detector of the comparison: RFS + federated loss and hard tile labels, no soft loss.

Classification mosaics still train the detector through their tiles' hard labels (the data's
defaults); only the semantic branch, and with it the soft-label KL, is removed.
"""

from __future__ import annotations

from typing import Any

from .base import Method


class Baseline(Method):
    name = "baseline"
    description = "plain detector: RFS + federated focal loss, hard tile labels, no soft loss"

    def model_overrides(self) -> dict[str, Any]:
        return {"head": {"semantic_branch": False}}
