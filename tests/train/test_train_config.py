"""Config loading: presets, YAML recipes, overrides, and errors reported before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from moon.errors import ConfigError
from moon.train import PRESETS, load_config
from moon.train.config import config_from_dict, parse_override

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize(
    ("preset", "name"),
    [("moon-tiny", "train-tiny.yaml"), ("moon-small", "train-small.yaml"), ("moon-3b", "train-3b.yaml")],
)
def test_yaml_recipes_equal_the_presets(preset, name):
    assert load_config(CONFIGS / name) == load_config(preset=preset)


def test_every_preset_round_trips_through_its_dict():
    for name in PRESETS:
        cfg = load_config(preset=name)
        assert config_from_dict(cfg.to_dict()) == cfg


def test_overrides_and_flags_apply_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: dual-encoder\noptim:\n  lr: 1e-4\n  steps: 7\n")
    cfg = load_config(
        f,
        preset="moon-small",
        overrides=["optim.lr=3e-4", "negatives.hard=4", "model.overrides={moe_mode: dense}"],
        extra={"optim": {"steps": 9}},
    )
    assert cfg.model.spec == "dual-encoder"
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.optim.steps == 9
    assert cfg.optim.chunk_size == 17  # from the preset
    assert cfg.negatives.hard == 4
    assert cfg.model.overrides == {"moe_mode": "dense"}
    assert parse_override("model=moon-tiny") == {"model": {"spec": "moon-tiny"}}


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("optim.lrr=1", "unknown key 'lrr'"),
        ("optimizer.lr=1", "unknown section 'optimizer'"),
        ("optim.steps=ten", "optim.steps: expected an integer"),
        ("optim.steps=0", "optim.steps: must be in [1, 99,999,999], got 0"),
        ("loss.temperature=-1", "loss.temperature"),
        ("negatives.in_batch=maybe", "negatives.in_batch: expected true/false"),
        ("data.modality_mix={video: 1}", "unknown modality 'video'"),
        ("run.precision=fp8", "run.precision"),
        ("optim.lr", "expected section.key=value"),
    ],
)
def test_bad_values_are_named(override, needle):
    with pytest.raises(ConfigError, match=None) as exc:
        load_config(preset="moon-tiny", overrides=[override])
    assert needle in str(exc.value)


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'moon-huge'"):
        load_config(preset="moon-huge")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_reports_config_errors_before_any_work(tmp_path, capsys):
    from moon.cli import main

    for args, needle in [
        (["train", "--steps", "5"], "--config FILE.yaml or --preset"),
        (["train", "--preset", "moon-tiny", "--out", str(tmp_path / "r")], "data.dir: no product store given"),
        (
            ["train", "--preset", "moon-tiny", "--data", str(tmp_path), "--out", str(tmp_path / "r")],
            "is not a product store",
        ),
        (
            ["train", "--preset", "moon-tiny", "optim.batch_size=-2"],
            "optim.batch_size: must be in [1, 1,048,576], got -2",
        ),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_print_config_shows_the_resolved_recipe(capsys):
    from moon.cli import main

    main(["train", "--preset", "moon-tiny", "--steps", "3", "--print-config", "negatives.queue_size=8"])
    text = capsys.readouterr().out
    assert "steps: 3" in text and "queue_size: 8" in text


def test_build_trainable_dispatch_and_errors():
    from moon.train import build_trainable

    toy = build_trainable("py:toy_embedder:make_toy", {"dim": 4})
    assert toy.dim == 4
    with pytest.raises(ConfigError, match="cannot import"):
        build_trainable("py:no_such_module:factory")
    with pytest.raises(ConfigError, match="'random' family cannot be trained"):
        build_trainable("random")
