"""RichSem (the default): soft CLIP labels through the semantic branch; nothing to add to the detector.

The detector, criterion and data defaults *are* RichSem's recipe (DESIGN §5), so this method changes
nothing; it exists so that ``method = "richsem"`` names the default explicitly.
"""

from __future__ import annotations

from .base import Method


class RichSem(Method):
    name = "richsem"
    description = "soft CLIP labels (semantic branch, KL on matched queries) + hard tile labels"
