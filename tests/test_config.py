import dataclasses

import pytest

from lt_distill.config import apply_overrides, from_dict, parse_override, to_dict
from lt_distill.errors import ConfigError


@dataclasses.dataclass
class Inner:
    width: int = 4
    scale: float = 1.0


@dataclasses.dataclass
class Outer:
    name: str = "tiny"
    inner: Inner = dataclasses.field(default_factory=Inner)
    sizes: tuple[int, ...] = (1, 2)
    mode: str | None = None


def test_from_dict_builds_nested_and_coerces_ints_to_floats():
    cfg = from_dict(Outer, {"name": "x", "inner": {"width": 8, "scale": 2}, "sizes": [3, 4]})
    assert cfg == Outer(name="x", inner=Inner(width=8, scale=2.0), sizes=(3, 4))
    assert isinstance(cfg.inner.scale, float)
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"inner\.widht"):
        from_dict(Outer, {"inner": {"widht": 3}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"inner\.width: expected an integer"):
        from_dict(Outer, {"inner": {"width": "wide"}})


def test_overrides_parse_literals_and_strings():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("name=tiny") == (["name"], "tiny")
    assert parse_override("sizes=[1, 2]") == (["sizes"], [1, 2])
    data = apply_overrides({"inner": {"width": 1}}, ["inner.width=5", "mode=fast"])
    assert data == {"inner": {"width": 5}, "mode": "fast"}
    with pytest.raises(ConfigError):
        parse_override("novalue")
