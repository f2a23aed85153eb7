"""What a long-tail method may change in the shared detector, criterion, data and training.

A :class:`Method` is a set of hooks with do-nothing defaults; the training loop, the model builders
and the evaluator call every hook unconditionally, so no code outside a method's own module asks
which method is running. A method contributes:

* ``model_overrides()`` / ``data_overrides()``: nested overrides on the model / data presets
  (applied after the preset and *after* the run's own ``[model]`` / ``[data]`` sections: they are
  what defines the method, and the resolved config of every run records them);
* ``extensions(hidden_dim, num_classes)``: extra modules on the detector (:class:`ModelExtension`);
* ``criterion_hooks(num_classes, hidden_dim, loss)``: extra, named loss terms and class-loss adjustments
  (:class:`CriterionHook`); their weights join the criterion's ``weight_dict``, the one place where
  losses are weighted; their buffers are the method's checkpoint state (``criterion.state_dict()``);
* ``prepare_model(model)``: the training stage's behaviour (which parameters train), before the
  optimizer is built;
* ``training_stages()``: the consecutive runs of a full training (BACL: representation, then
  classifier), each initialised from the previous one's final model (``lt-distill demo`` runs them).

Post-processing scores come from the extensions (:meth:`ModelExtension.score`), so an exported or
evaluated model scores its detections the way its method defines without knowing the method.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn


@dataclasses.dataclass
class NoOptions:
    """A method without settings of its own (``[method_options]`` must stay empty)."""


class ModelExtension(nn.Module):
    """An extra module on the detector (``DINO.extensions[name]``).

    ``forward(hidden, outputs)``: hidden ``(B, Q, D)`` of one decoder layer and that layer's outputs so
    far -> extra output entries (e.g. ``{"pred_bg": (B, Q, 1)}``), added to every layer's outputs.
    ``score(outputs, prob)``: the post-processor's class probabilities ``(B, Q, C)`` given the final
    outputs (default: unchanged). ``needs_views``: the training outputs carry ``"decode_views"`` and
    ``"head_outputs"`` (see ``DINO.decode_views`` / ``DINO.head_outputs``)."""

    needs_views: ClassVar[bool] = False

    def forward(self, hidden: torch.Tensor, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {}

    def score(self, outputs: dict[str, Any], prob: torch.Tensor) -> torch.Tensor:
        return prob


class CriterionHook(nn.Module):
    """Extra loss terms of a method, computed by ``SetCriterion`` after its own losses.

    ``weights``: name -> weight of every loss this hook returns (joins ``weight_dict``).
    ``adjust_class_loss``: per-element logit offsets and weights of the focal class loss (default None:
    the base loss). ``extra_losses``: named losses from the final layer's outputs and Hungarian
    indices. State that must survive a resume lives in buffers (saved with the criterion)."""

    weights: dict[str, float] = {}

    def adjust_class_loss(self, outputs: dict[str, Any], batch: torch.Tensor, src: torch.Tensor,
                          labels: torch.Tensor, suffix: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """outputs of one layer (``pred_logits`` ``(B, Q, C)``), matched ``batch``/``src`` query indices and
        their ``labels`` (``(N,)``, -1 = unknown); ``suffix`` names the layer ("" = final layer).
        Returns (logit offset, element weight), each ``(B, Q, C)`` or None."""
        return None, None

    def extra_losses(self, outputs: dict[str, Any], targets: list[dict], indices: list, num_boxes: float,
                     classes: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {}


@dataclasses.dataclass
class TrainingStage:
    """One run of a method's full training: overrides on the training config (plain data) and the
    share of the schedule it takes (the demo scales its iterations by it)."""

    name: str
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    iters_fraction: float = 1.0


class Method:
    """One method (see the module docstring). Subclasses set ``name`` and, with settings, ``Options``
    (a dataclass validated from the training config's ``[method_options]`` section)."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    description: ClassVar[str] = ""

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    def model_overrides(self) -> dict[str, Any]:
        return {}

    def data_overrides(self) -> dict[str, Any]:
        return {}

    def extensions(self, hidden_dim: int, num_classes: int) -> dict[str, ModelExtension]:
        return {}

    def criterion_hooks(self, num_classes: int, hidden_dim: int, loss: Any) -> dict[str, CriterionHook]:
        """Named hooks for ``SetCriterion`` (``loss``: the model's ``LossConfig``, e.g. its focal settings)."""
        return {}

    def prepare_model(self, model: nn.Module) -> None:
        """Train-stage behaviour before the optimizer is built (default: everything trains)."""

    def training_stages(self) -> list[TrainingStage]:
        return [TrainingStage("train")]
