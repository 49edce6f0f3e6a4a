"""The learning-rate schedule: linear warmup, then constant or a cosine decay to 0."""
import math

import numpy as np
import pytest

from ipu_diffusion.config import ConfigError, config_from_dict
from ipu_diffusion.training.trainer import WarmupSchedule, lr_schedule


def _lr(schedule, step):
    return float(schedule(step))


def test_warmup_then_constant():
    s = WarmupSchedule(1e-3, warmup_steps=10)
    assert _lr(s, 0) == pytest.approx(1e-4)  # (0 + 1) / 10 of the peak
    assert _lr(s, 9) == pytest.approx(1e-3)
    assert _lr(s, 10_000) == pytest.approx(1e-3)


def test_cosine_decay_reaches_zero_at_training_steps():
    cfg = config_from_dict({"training": {"steps": 110, "lr": 2e-3, "warmup_steps": 10,
                                         "lr_decay": "cosine"}})
    s = lr_schedule(cfg.training)
    assert _lr(s, 9) == pytest.approx(2e-3)  # end of warmup: the peak
    # half-way through the decay: 0.5 (1 + cos(pi / 2)) = 0.5 of the peak
    assert _lr(s, 60) == pytest.approx(1e-3, rel=1e-5)
    expected = 2e-3 * 0.5 * (1 + math.cos(math.pi * 25 / 100))
    assert _lr(s, 35) == pytest.approx(expected, rel=1e-5)
    assert _lr(s, 110) == pytest.approx(0.0, abs=1e-12) and _lr(s, 500) == pytest.approx(0.0, abs=1e-12)
    lrs = np.array([_lr(s, k) for k in range(10, 111)])
    assert np.all(np.diff(lrs) <= 1e-12)  # monotone after the warmup
    assert WarmupSchedule(**s.get_config()).get_config() == s.get_config()


def test_lr_decay_is_a_checked_choice():
    assert lr_schedule(config_from_dict({}).training).decay_steps == 0  # default: constant
    with pytest.raises(ConfigError, match="training.lr_decay"):
        config_from_dict({"training": {"lr_decay": "linear"}})
