"""Schedules: warmup + cosine and BitNet's two stages (lr drop and weight decay off at the split)."""

import io
import math

import pytest
import torch
from torch import nn

import optim


def adamw(lr=1.0, wd=0.1):
    p = nn.Parameter(torch.zeros(2, 2))
    return torch.optim.AdamW([p], lr=lr, weight_decay=wd)


def lrs_and_wds(sched, opt, steps):
    out = []
    for _ in range(steps):
        out.append((opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]))
        opt.step()
        sched.step()
    return out


def test_two_stage_schedule_values():
    opt = adamw()
    sched = optim.two_stage_schedule(opt, total_steps=100, warmup_steps=10)
    seen = lrs_and_wds(sched, opt, 101)
    lr = [a for a, _ in seen]
    wd = [b for _, b in seen]
    assert lr[0] == pytest.approx(1 / 11) and lr[9] == pytest.approx(10 / 11)
    assert lr[10] == pytest.approx(1.0)  # the peak, right after warmup
    assert lr[49] == pytest.approx(8 / 15 + (1 - 8 / 15) * 0.5 * (1 + math.cos(math.pi * 39 / 40)))
    assert lr[50] == pytest.approx(1 / 3)  # the sudden drop at the split
    assert lr[49] - lr[50] > 0.19
    assert lr[100] == pytest.approx(0.0, abs=1e-12)
    assert all(lr[i] >= lr[i + 1] for i in range(10, 100) if i != 49)  # decays within each stage
    assert wd[:50] == [0.1] * 50 and wd[50:] == [0.0] * 51


def test_warmup_cosine_values():
    opt = adamw(lr=2.0)
    sched = optim.warmup_cosine(opt, total_steps=20, warmup_steps=4, min_lr_ratio=0.1)
    lr = [a for a, _ in lrs_and_wds(sched, opt, 21)]
    assert lr[0] == pytest.approx(2 * 1 / 5) and lr[4] == pytest.approx(2.0)
    assert lr[12] == pytest.approx(2 * (0.1 + 0.9 * 0.5))
    assert lr[20] == pytest.approx(0.2)


def test_schedule_state_round_trips():
    opt = adamw()
    sched = optim.two_stage_schedule(opt, total_steps=50, warmup_steps=5)
    lrs_and_wds(sched, opt, 30)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    opt2 = adamw()
    sched2 = optim.two_stage_schedule(opt2, total_steps=50, warmup_steps=5)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert lrs_and_wds(sched, opt, 10) == lrs_and_wds(sched2, opt2, 10)


@pytest.mark.parametrize("cfg,match", [
    ({"name": "linear"}, "unknown schedule 'linear'; choose one of"),
    ({"name": "cosine", "warmup_steps": -1}, r"warmup_steps=-1 is invalid"),
    ({"name": "cosine", "warmup_steps": 2.5}, r"warmup_steps=2.5 is invalid"),
    ({"name": "two_stage", "split": 1.5}, "split=1.5"),
    ({"name": "two_stage", "warmup_steps": 60}, "inside the warmup"),
    ({"name": "cosine", "min_lr_ratio": 2}, "min_lr_ratio=2"),
    ({"name": "cosine", "decay": 1}, r"schedule 'cosine': unknown key\(s\) \['decay'\]; valid: \['min_lr_ratio', 'warmup_steps'\]"),
    ({"name": "constant", "min_lr_ratio": 0.1}, r"schedule 'constant': unknown key\(s\) \['min_lr_ratio'\]"),
    ({"name": "constant", "warmup_steps": "ten"}, r"warmup_steps='ten' is invalid"),
])
def test_bad_schedules_raise(cfg, match):
    with pytest.raises(ValueError, match=match):
        optim.build_scheduler(adamw(), cfg, total_steps=100)


@pytest.mark.parametrize("name", ["constant", "cosine", "two_stage"])
def test_a_warmup_longer_than_the_run_is_shortened_with_a_note(name, caplog):
    """``train.steps=30`` with the configs' 100-step warmup just runs: warmup becomes 3 steps (a tenth),
    so the peak learning rate is reached at step 3, and the log says so."""
    opt = adamw()
    with caplog.at_level("WARNING", logger="optim.schedule"):
        sched = optim.build_scheduler(opt, {"name": name, "warmup_steps": 100}, total_steps=30)
    assert "warmup_steps=100 is not shorter than the run (30 steps): warming up for 3 steps" in caplog.text
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    peak = opt.param_groups[0]["initial_lr"]
    assert lrs[:3] == [peak * k / 4 for k in (1, 2, 3)] and lrs[3] == pytest.approx(peak, rel=1e-2)

