"""optim.lr_scale: per-parameter learning-rate factors by name pattern, kept through the schedule."""

from __future__ import annotations

import pytest
import torch

from moon.errors import ConfigError
from moon.train.config import OptimConfig, config_from_dict
from moon.train.optim import build_optimizer, build_scheduler, lr_multiplier


def _named():
    net = torch.nn.ModuleDict(
        {"projector": torch.nn.Linear(3, 4), "lm": torch.nn.Linear(4, 4), "frozen": torch.nn.Linear(4, 2)}
    )
    net["frozen"].requires_grad_(False)
    return list(net.named_parameters())


def test_first_matching_pattern_wins():
    scale = {"^projector\\.": 10.0, "proj": 3.0}
    assert lr_multiplier("projector.weight", scale) == 10.0
    assert lr_multiplier("lm.q_proj.weight", scale) == 3.0
    assert lr_multiplier("lm.weight", scale) == 1.0


def test_groups_get_scaled_lr_and_decay_and_keep_the_ratio_through_the_schedule():
    named = _named()
    config = OptimConfig(lr=1e-3, lr_scale={"projector": 10.0}, steps=10, warmup_steps=2, weight_decay=0.1)
    opt = build_optimizer(named, config)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    params = dict(named)
    assert lr_of[id(params["projector.weight"])] == (pytest.approx(1e-2), 0.1)
    assert lr_of[id(params["projector.bias"])] == (pytest.approx(1e-2), 0.0)
    assert lr_of[id(params["lm.weight"])] == (pytest.approx(1e-3), 0.1)
    assert id(params["frozen.weight"]) not in lr_of  # no gradient, not optimised
    sched = build_scheduler(opt, config)
    for _ in range(5):
        opt.step()
        sched.step()
    lrs = {g["lr"] for g in opt.param_groups}
    assert max(lrs) / min(lrs) == pytest.approx(10.0)


def test_bad_lr_scale_is_a_config_error(tmp_path):
    for bad, msg in (({"(": 2}, "regular expression"), ({"x": 0}, "factor"), ({"x": True}, "expected a number")):
        with pytest.raises(ConfigError, match=msg):
            config_from_dict({"data": {"dir": str(tmp_path)}, "optim": {"lr_scale": bad}})
