import numpy as np
import pytest

from dino.train.schedules import cosine_schedule, teacher_temperature_schedule


def test_cosine_end_points_and_warmup():
    s = cosine_schedule(1.0, 0.1, epochs=10, iters_per_epoch=5, warmup_epochs=2, warmup_start_value=0.0)
    assert len(s) == 50
    assert s[0] == 0.0 and s[9] == pytest.approx(0.9)  # linear warmup over 10 iterations
    assert s[10] == pytest.approx(1.0) and s[-1] == pytest.approx(0.1)
    assert np.all(np.diff(s[10:]) <= 1e-12)  # monotone decay after warmup
    mid = 10 + (40 - 1) / 2
    assert np.interp(mid, np.arange(50), s) == pytest.approx(0.55)  # half-way = mean of ends


def test_momentum_schedule_rises_to_one():
    s = cosine_schedule(0.996, 1.0, epochs=3, iters_per_epoch=7)
    assert s[0] == pytest.approx(0.996) and s[-1] == pytest.approx(1.0)
    assert np.all(np.diff(s) >= -1e-12)


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
    from dino.train.config import load_config
    from dino.train.schedules import Schedules

    with caplog.at_level("WARNING", logger="dino.train.schedules"):
        Schedules.build(load_config(None, ["run.epochs=10"]), iters_per_epoch=4, world_size=1)
    text = caplog.text
    assert "loss.warmup_teacher_temp_epochs=30 is longer than run.epochs=10" in text
    assert "ends at 0.04931" in text  # 0.04 + 9/29 × 0.03: the tenth of 30 warm-up epochs
    assert (
        "optim.warmup_epochs=10 covers all of run.epochs=10: the learning rate ends at 0.000122, not at its peak 0.000125"
        in text
    )  # 39/40 of it
    caplog.clear()
    with caplog.at_level("WARNING", logger="dino.train.schedules"):
        Schedules.build(load_config(None, ["run.epochs=40"]), iters_per_epoch=4, world_size=1)
    assert caplog.text == ""
