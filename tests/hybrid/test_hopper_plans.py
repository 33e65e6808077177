"""The hybrid under the paper's policy with the plans it gets on a Hopper GPU, run on the CPU (FP8 GEMMs
through ``torch._scaled_mm``, which the CPU build runs; the FP8 operators' reference paths)."""
from pathlib import Path

import torch
from omegaconf import OmegaConf

import lowprec
from hybrid import HybridLM, preset

PAPER = Path(__file__).resolve().parents[2] / "configs" / "precision" / "paper.yaml"


def _step(monkeypatch, takes_codes: bool):
    monkeypatch.setattr(lowprec.plan, "BF16_TAKES_FP8_CODES", takes_codes)
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = HybridLM(cfg)
    lowprec.apply_policy(model, OmegaConf.load(PAPER))
    plans = []
    for m in model.modules():
        if hasattr(m, "plan_for"):
            m._plan = m.plan_for("sm90")
            plans.append(m._plan)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.window), generator=torch.Generator().manual_seed(1))
    loss = model(x)[0].float().logsumexp(-1).mean()  # (logits, state)
    loss.backward()
    return plans, loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_bf16_gemms_taking_the_fp8_codes_change_no_bit(monkeypatch):
    """With the bf16 GEMMs taking the FP8 GEMMs' codes (the attention's, fusion's, feed-forward's and
    head's wgrad the input's codes; the feed-forward's and head's dgrad fprop's FP4 weight codes) the
    tiny hybrid's loss and every gradient equal, bit for bit, those with each GEMM quantizing its
    operands itself (eager)."""
    plans, loss, grads = _step(monkeypatch, True)
    across = [p for p in plans if p.reuse_input and p.fprop.kernel.startswith("fp8")
              and p.wgrad.kernel == "bf16_tensorcore"]
    assert across and any(p.reuse_weight and p.dgrad.kernel == "bf16_tensorcore" for p in across)
    plans0, loss0, grads0 = _step(monkeypatch, False)
    assert not any(p.reuse_input and p.fprop.kernel.startswith("fp8") and p.wgrad.kernel == "bf16_tensorcore"
                   for p in plans0)
    assert torch.equal(loss, loss0) and grads.keys() == grads0.keys()
    for name, g in grads.items():
        assert torch.equal(g, grads0[name]), name
