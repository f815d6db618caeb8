import json

import pytest

from moon.errors import ConfigError
from moon.model.config import PRESETS, MoonConfig


def test_config_json_round_trip():
    cfg = MoonConfig(pooling="last", moe_layers=[0, 1], projection_dim=32, matryoshka_dim=16)
    again = MoonConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize(
    "field,value",
    [("pooling", "max"), ("moe_mode", "soft"), ("moe_top_k", 9), ("max_images", -1), ("min_pixels", 0)],
)
def test_bad_values_raise_config_error_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        MoonConfig(**{field: value})


def test_unknown_field_is_an_error():
    with pytest.raises(ConfigError, match="moe_mod"):
        MoonConfig().replace(moe_mod="dense")


def test_presets_exist():
    assert {"moon-tiny", "moon-small", "moon-3b"} <= set(PRESETS)
