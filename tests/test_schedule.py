"""Specification of the learning-rate schedules (train.schedule, lm.schedule): each curve step by
step against its closed form, and the logged train/lr as the rate each step's update used."""

import math

import pytest
import torch

from conftest import MIXTURE_TRAIN, TINY_TRAIN, metric_from
from lm.config import TrainConfig
from lm.schedule import build_scheduler, lr_at

LR, MIN_LR = TINY_TRAIN["lr"], TINY_TRAIN["min_lr"]


def train_config(**overrides) -> TrainConfig:
    return TrainConfig(**{"steps": 50, "warmup_steps": 5, "lr": LR, "min_lr": MIN_LR, **overrides})


def warmup(step: int, warmup_steps: int = 5) -> float:
    return LR * (step + 1) / warmup_steps


def wsd(step: int, steps: int, warmup_steps: int, decay_steps: int, shape: str) -> float:
    """Warmup, lr, then the last decay_steps steps from just below lr down to min_lr at the last step."""
    if step < warmup_steps:
        return warmup(step, warmup_steps)
    if step < steps - decay_steps:
        return LR
    progress = (step - (steps - decay_steps) + 1) / decay_steps
    return MIN_LR + (LR - MIN_LR) * (1 - (math.sqrt(progress) if shape == "1-sqrt" else progress))


def test_cosine_is_the_default_and_unchanged():
    config = train_config()
    assert config.schedule == "cosine"
    for step in range(50):
        expected = (
            warmup(step) if step < 5 else MIN_LR + 0.5 * (1 + math.cos(math.pi * ((step - 5) / 45))) * (LR - MIN_LR)
        )
        assert lr_at(step, config) == expected  # bitwise: the same expression as before schedules had names


def test_constant_warms_up_then_holds_the_rate():
    config = train_config(schedule="constant")
    assert [lr_at(step, config) for step in range(50)] == [warmup(s) for s in range(5)] + [LR] * 45


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_warms_up_holds_then_decays_to_min_lr_at_the_last_step(shape):
    config = train_config(schedule="wsd", decay_steps=15, decay_shape=shape)
    curve = [lr_at(step, config) for step in range(50)]
    assert curve == pytest.approx([wsd(s, 50, 5, 15, shape) for s in range(50)], rel=1e-15, abs=0)
    assert curve[34] == LR and curve[35] < LR and curve[49] == MIN_LR
    assert all(a > b for a, b in zip(curve[34:], curve[35:]))  # strictly down through the decay


def test_wsd_may_decay_straight_after_warmup():
    config = train_config(schedule="wsd", decay_steps=45)
    assert lr_at(4, config) == LR and lr_at(5, config) == pytest.approx(wsd(5, 50, 5, 45, "linear"), rel=1e-15)


def test_the_optimizer_steps_at_the_rate_of_the_schedule():
    """What the engine logs as train/lr is the optimizer's rate before the step; LambdaLR sets it from lr_at."""
    config = train_config(schedule="wsd", decay_steps=15, decay_shape="1-sqrt")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = build_scheduler(optimizer, config)
    for step in range(50):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(step, config), rel=1e-15)
        optimizer.step()
        scheduler.step()


@pytest.mark.slow
def test_the_run_logs_every_step_at_the_rate_of_its_update(mixture_runs):
    """50 steps of wsd with a 1-sqrt decay (conftest.MIXTURE_TRAIN), step by step against the closed form."""
    t = MIXTURE_TRAIN
    logged = metric_from(mixture_runs / "straight", "train/lr")
    assert sorted(logged) == list(range(1, 51))  # metrics.jsonl's step N is the N-th update, step N - 1 here
    for done, lr in logged.items():
        expected = wsd(done - 1, t["steps"], t["warmup_steps"], t["decay_steps"], t["decay_shape"])
        assert lr == pytest.approx(expected, rel=1e-12), done
    assert logged[35] == LR and logged[50] == pytest.approx(MIN_LR, rel=1e-12)
