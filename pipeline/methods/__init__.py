"""Long-tail methods on the one detector (``method = "richsem" | "baseline" | "bacl" | "clis"``).

A method is one module here plus one entry in :data:`METHODS`; ``base.py`` lists the hooks. Every
method is built the same way from a training config's plain data::

    method = build_method("bacl", {"stage": "classifier"})
    model, criterion, postprocess = build_model(model_cfg, text, counts, method=method)
"""

from __future__ import annotations

from typing import Any

from ...config import from_dict, to_dict
from ...errors import ConfigError
from .bacl import BACL
from .base import CriterionHook, Method, ModelExtension, NoOptions, TrainingStage
from .baseline import Baseline
from .richsem import RichSem

DEFAULT_METHOD = "richsem"
METHODS: dict[str, type[Method]] = {m.name: m for m in (RichSem, Baseline, BACL)}


def build_method(name: str = DEFAULT_METHOD, options: dict[str, Any] | None = None) -> Method:
    """The named method with its ``options`` (plain data, validated into its ``Options`` dataclass)."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    cls = METHODS[name]
    return cls(from_dict(cls.Options, dict(options or {}), "method_options"))


def method_options_dict(method: Method) -> dict[str, Any]:
    return to_dict(method.options)


def method_from_config(config: dict[str, Any]) -> Method:
    """The method of a checkpoint's config (a training config's plain data; a bare model config, or one
    written before methods existed, is RichSem)."""
    return build_method(config.get("method", DEFAULT_METHOD), config.get("method_options") or {})


__all__ = ["DEFAULT_METHOD", "METHODS", "CriterionHook", "Method", "ModelExtension", "NoOptions", "TrainingStage", "build_method",
           "method_from_config", "method_options_dict"]
