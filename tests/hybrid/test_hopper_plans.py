"""The hybrid under the paper's policy with the plans it gets on a Hopper GPU, run on the CPU (FP8 GEMMs
through ``torch._scaled_mm``, which the CPU build runs; the FP8 operators' reference paths)."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import lowprec
from hybrid import HybridLM, preset

PAPER = Path(__file__).resolve().parents[2] / "configs" / "precision" / "paper.yaml"


# the policy with per-token FP8 activation and gradient scales (its override for them)
PER_TOKEN = [{"match": ["blocks.*", "fusion.*", "head"], "input": "fp8_e4m3", "grad": "fp8_e5m2"},
             {"match": "embed.*", "grad": "fp8_e5m2"}]


def _step(monkeypatch, shared: bool, activations: str):
    """One forward and backward of the tiny hybrid; ``shared``: operands shared across kernels (a bf16 GEMM
    taking an FP8 GEMM's codes, the two FP8 kernels sharing a per-tensor operand, a bf16 dgrad taking an
    FP8 wgrad's gradient codes) or each GEMM quantizing its operands itself. A bf16 dgrad folding the
    gradient's scale into fprop's weight codes (``BF16_DGRAD_FOLDS_GRAD_SCALE``) is off in both: it can
    only fold what it shares, and it changes last bits (its bound: tests/lowprec/test_layers.py)."""
    monkeypatch.setattr(lowprec.gemm, "BF16_DGRAD_FOLDS_GRAD_SCALE", False)
    monkeypatch.setattr(lowprec.plan, "BF16_TAKES_FP8_CODES", shared)
    monkeypatch.setattr(lowprec.gemm, "BF16_DGRAD_TAKES_WGRAD_CODES", shared)
    same = lowprec.kernels.same_operand if shared else (lambda k1, k2, fmt: k1 == k2)
    monkeypatch.setattr(lowprec.kernels, "same_operand", same)
    monkeypatch.setattr(lowprec.gemm, "same_operand", same)
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = HybridLM(cfg)
    policy = OmegaConf.load(PAPER)
    if activations == "token":
        policy.override = PER_TOKEN
    lowprec.apply_policy(model, policy)
    plans = []
    for m in model.modules():
        if hasattr(m, "plan_for"):
            m._plan = m.plan_for("sm90")
            plans.append(m._plan)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.window), generator=torch.Generator().manual_seed(1))
    loss = model(x)[0].float().logsumexp(-1).mean()  # (logits, state)
    loss.backward()
    return plans, loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _across(p) -> bool:
    """Whether a plan has a GEMM taking an operand that another kernel made."""
    return ((p.reuse_input and p.fprop.kernel != p.wgrad.kernel) or (p.reuse_weight and p.fprop.kernel != p.dgrad.kernel)
            or (p.reuse_grad and p.dgrad.kernel != p.wgrad.kernel)
            or (p.dgrad.kernel == "bf16_tensorcore" and lowprec.gemm._grad_from_wgrad(p)))


@pytest.mark.parametrize("activations", ["tensor", "token"])
def test_operands_shared_across_kernels_change_no_bit(monkeypatch, activations, cpu_row_scales):
    """With operands shared across kernels the tiny hybrid's loss and every gradient equal, bit for bit,
    those with each GEMM quantizing its operands itself (eager). The policy as shipped (per-tensor
    activations): the feed-forward's and head's wgrad take fprop's input codes (row-wise and tensor-wise FP8
    kernels), their dgrad fprop's FP4 weight codes and wgrad's gradient codes (bf16 kernel). With per-token
    activations: every wgrad runs in bf16 and takes the input's codes, the feed-forward's and head's dgrad
    fprop's weight codes."""
    plans, loss, grads = _step(monkeypatch, True, activations)
    ffn = [p for p in plans if p.precision.weight is not None and p.precision.weight.name == "fp4_e2m1"]
    assert ffn and all(_across(p) and p.reuse_weight and p.dgrad.kernel == "bf16_tensorcore" for p in ffn)
    if activations == "tensor":
        assert all(p.wgrad.kernel == "fp8_tensorwise" and p.reuse_input and lowprec.gemm._grad_from_wgrad(p)
                   for p in ffn)
    else:
        assert all(p.wgrad.kernel == "bf16_tensorcore" and p.reuse_input for p in plans if p.fprop.kernel.startswith("fp8"))
    plans0, loss0, grads0 = _step(monkeypatch, False, activations)
    assert not any(_across(p) for p in plans0)
    assert torch.equal(loss, loss0) and grads.keys() == grads0.keys()
    for name, g in grads.items():
        assert torch.equal(g, grads0[name]), name
