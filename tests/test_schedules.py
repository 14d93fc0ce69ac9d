import math

import numpy as np
import pytest

from dino.config import load_config
from dino.train.schedules import Schedules, cosine_schedule, teacher_temperature_schedule

from .original_dino import cosine_scheduler


def test_cosine_end_points_and_warmup():
    s = cosine_schedule(1.0, 0.1, epochs=10, iters_per_epoch=5, warmup_epochs=2, warmup_start_value=0.0)
    assert len(s) == 50
    np.testing.assert_allclose(s[:10], np.arange(10) / 9)  # the warm-up ends exactly at the peak
    assert s[10] == 1.0  # the cosine starts there: cos(0)
    assert np.all(np.diff(s[10:]) < 0)  # monotone decay after warmup
    # The cosine runs over the 40 remaining iterations at 0 … 39 of 40: its last value is short of 0.1.
    assert s[-1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 39 / 40)))
    assert s[30] == pytest.approx(0.55)  # a quarter turn: the mean of the ends


def test_momentum_schedule_rises_towards_one_without_reaching_it():
    s = cosine_schedule(0.996, 1.0, epochs=3, iters_per_epoch=7)
    assert s[0] == 0.996 and np.all(np.diff(s) > 0)
    assert s[-1] == pytest.approx(1 - 0.002 * (1 + math.cos(math.pi * 20 / 21)), abs=1e-15) and s[-1] < 1


@pytest.mark.parametrize(
    "epochs, niter_per_ep, warmup_epochs",
    [(100, 1251, 10), (800, 1251, 10), (3, 7, 1), (10, 5, 2), (5, 4, 0), (1, 1, 0), (2, 3, 2), (4, 1, 3)],
)
def test_schedules_equal_the_originals_arrays(epochs, niter_per_ep, warmup_epochs):
    """lr (with warm-up), weight decay and teacher momentum, value for value, as the original's
    utils.cosine_scheduler gives them; 1251 iterations of 1024 images are an ImageNet epoch."""
    cases = [
        ((0.002, 1e-6, epochs, niter_per_ep), {"warmup_epochs": warmup_epochs}),
        ((0.04, 0.4, epochs, niter_per_ep), {}),
        ((0.996, 1.0, epochs, niter_per_ep), {}),
        ((0.5, 0.1, epochs, niter_per_ep), {"warmup_epochs": warmup_epochs, "start_warmup_value": 0.2}),
    ]
    for args, kwargs in cases:
        ours = cosine_schedule(
            *args,
            warmup_epochs=kwargs.get("warmup_epochs", 0),
            warmup_start_value=kwargs.get("start_warmup_value", 0),
        )
        assert np.array_equal(ours, cosine_scheduler(*args, **kwargs)), (args, kwargs)


def test_the_published_vit_small_recipe_gives_the_originals_schedules():
    """ViT-S/16, 100 epochs, 16 processes x 64 images (1251 iterations an epoch): main_dino.py's lr, weight
    decay and momentum arrays, from our preset."""
    cfg = load_config("vit_small_100ep")
    niter = 1281167 // 1024  # ImageNet's training images, drop_last
    schedules = Schedules.build(cfg, iters_per_epoch=niter, world_size=16)
    lr = cosine_scheduler(0.0005 * (64 * 16) / 256.0, 1e-6, 100, niter, warmup_epochs=10)
    assert np.array_equal(schedules.lr, lr)
    assert np.array_equal(schedules.weight_decay, cosine_scheduler(0.04, 0.4, 100, niter))
    assert np.array_equal(schedules.momentum, cosine_scheduler(0.996, 1, 100, niter))
    assert schedules.lr[10 * niter - 1] == 0.002 and schedules.lr[-1] > 1e-6 and schedules.momentum[-1] < 1


def test_a_warmup_longer_than_the_run_follows_its_beginning():
    """The original refuses it; a short trial of a long recipe follows the first iterations of its
    warm-up (the same slope), as the teacher temperature does."""
    s = cosine_schedule(1.0, 0.0, epochs=2, iters_per_epoch=3, warmup_epochs=4)
    np.testing.assert_allclose(s, np.arange(6) / 11)


def test_teacher_temperature():
    t = teacher_temperature_schedule(0.04, 0.07, warmup_epochs=30, epochs=100)
    assert len(t) == 100 and t[0] == pytest.approx(0.04) and t[29] == pytest.approx(0.07)
    assert np.all(t[30:] == 0.07)
    assert teacher_temperature_schedule(0.04, 0.04, 0, 5).tolist() == [0.04] * 5


def test_a_run_shorter_than_the_teacher_temperature_warmup_follows_its_beginning():
    """3 epochs of a 30-epoch warm-up: the first 3 values of that warm-up, not a warm-up squeezed into 3."""
    t = teacher_temperature_schedule(0.04, 0.07, warmup_epochs=30, epochs=3)
    np.testing.assert_allclose(t, [0.04, 0.04 + 0.03 / 29, 0.04 + 0.06 / 29])


def test_warmups_cut_by_a_short_run_are_reported(caplog):
    with caplog.at_level("WARNING", logger="dino.train.schedules"):
        Schedules.build(load_config(None, ["run.epochs=10"]), iters_per_epoch=4, world_size=1)
    text = caplog.text
    assert "loss.warmup_teacher_temp_epochs=30 is longer than run.epochs=10" in text
    assert "ends at 0.04931" in text  # 0.04 + 9/29 × 0.03: the tenth of 30 warm-up epochs
    # 40 warm-up iterations of 40: the peak 0.0005 × 64 / 256 at the last one, and no decay.
    assert (
        "optim.warmup_epochs=10 covers all of run.epochs=10: the learning rate rises for the whole run, to "
        "0.000125 at its end (peak 0.000125), and never decays" in text
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="dino.train.schedules"):
        Schedules.build(load_config(None, ["run.epochs=5"]), iters_per_epoch=4, world_size=1)
    assert "to 6.09e-05 at its end (peak 0.000125)" in caplog.text  # 19/39 of the peak
    caplog.clear()
    with caplog.at_level("WARNING", logger="dino.train.schedules"):
        Schedules.build(load_config(None, ["run.epochs=40"]), iters_per_epoch=4, world_size=1)
    assert caplog.text == ""
