"""The training benchmark's variants, built on the CPU (the timing itself needs a GPU)."""
import argparse

import pytest
import torch

import experiments.bench_train as bench
import lowprec
from lowprec import kernels

TINY = dict(d=64, blocks=1, heads=4, T=16, B=2)


def fprop_kernels(model) -> set[str]:
    return {m.plan.fprop.kernel for m in model.modules() if hasattr(m, "plan")}


def test_int8_variants_plan_int8_gemms_and_leave_the_default_order(monkeypatch):
    """``windowed:ternary@int8`` builds its layers with ``AUTO_ORDER_INT8`` (their fprop on the int8
    kernel, named in the row's plans) and puts the default order back; the plain variant keeps
    the default plans."""
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, device=None: self)  # stay on the CPU
    before = kernels.AUTO_ORDER
    with bench.settings("windowed:ternary@int8"):
        assert kernels.AUTO_ORDER is kernels.AUTO_ORDER_INT8
    assert kernels.AUTO_ORDER is before
    model, _, _, _, note = bench.build("windowed:ternary@int8", TINY)  # build() applies the suffix itself
    assert kernels.AUTO_ORDER is before
    assert "int8_tensorcore" in fprop_kernels(model) and "int8_tensorcore" in note
    model, _, _, _, note = bench.build("windowed:ternary", TINY)
    assert "int8_tensorcore" not in fprop_kernels(model) and "int8_tensorcore" not in note
    assert {v for v in bench.VARIANTS if v.endswith("@int8")} == {
        f"{m}:{p}@int8" for m in ("windowed", "hybrid") for p in ("ternary", "ternary_native")}


def test_amax_variants_switch_the_fp8_amax_and_put_it_back(monkeypatch):
    """``@amax-pass`` / ``@amax-stored`` / ``@amax-inline`` set ``Fp8.amax_in_graph`` and
    ``Fp8.amax_reads_stored`` only inside their ``settings``; each builds the FP8 policy's model;
    ``@rows-one-kernel`` sets ``fp8_cast.ROWS_IN_ONE_KERNEL`` the same way; an unknown suffix is refused."""
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, device=None: self)
    fp8 = kernels.Fp8
    before = (fp8.amax_in_graph, fp8.amax_reads_stored)
    assert before == (False, True)
    plain = fprop_kernels(bench.build("windowed:fp8", TINY)[0])
    for suffix, want in (("amax-pass", (False, True)), ("amax-stored", (True, True)), ("amax-inline", (True, False))):
        with bench.settings(f"windowed:fp8@{suffix}"):
            assert (fp8.amax_in_graph, fp8.amax_reads_stored) == want
            model, _, _, _, _ = bench.build(f"windowed:fp8@{suffix}", TINY)
        assert (fp8.amax_in_graph, fp8.amax_reads_stored) == before
        assert fprop_kernels(model) == plain
    assert not lowprec.fp8_cast.ROWS_IN_ONE_KERNEL
    with bench.settings("windowed:paper@rows-one-kernel"):
        assert lowprec.fp8_cast.ROWS_IN_ONE_KERNEL
    assert not lowprec.fp8_cast.ROWS_IN_ONE_KERNEL
    with pytest.raises(ValueError, match="unknown suffix @nope"):
        with bench.settings("windowed:fp8@nope"):
            pass


def test_plan_and_compiler_variants_switch_their_setting_and_put_it_back():
    """``@bf16-requantizes`` builds Hopper plans whose bf16 GEMMs quantize again what an FP8 GEMM of the
    layer quantized (no reuse across kernels), the default plans reuse those codes; ``@multi-kernel``
    turns inductor's multi-kernel reductions on inside its ``settings`` only."""
    from lowprec import LayerPrecision
    from lowprec.plan import build_plan

    attention = LayerPrecision.from_fields({"weight": "fp8_e4m3", "input": "fp8_e4m3", "grad": "fp8_e5m2"})

    def reuse():
        plan = build_plan(attention, 2048, 2048, "sm90")
        assert (plan.fprop.kernel, plan.wgrad.kernel) == ("fp8_rowwise", "bf16_tensorcore")
        return plan.reuse_input, plan.reuse_grad

    assert reuse() == (True, True)
    with bench.settings("windowed:paper@bf16-requantizes"):
        assert reuse() == (False, False)
    assert reuse() == (True, True)
    triton = torch._inductor.config.triton
    before = triton.multi_kernel
    with bench.settings("windowed:bf16@multi-kernel"):
        assert triton.multi_kernel == 1
    assert triton.multi_kernel == before == 0
    assert {v for v in bench.VARIANTS if v.endswith("@multi-kernel")} == {
        f"{m}:{p}@multi-kernel" for m in ("windowed", "hybrid") for p in bench.POLICIES}


def test_token_activation_variant_and_combined_suffixes(monkeypatch):
    """The paper policy scales activations and gradients per tensor (the attention all tensor-wise FP8; the
    feed-forward's fprop row-wise beside its per-row FP4 weight, its dgrad bf16, its wgrad tensor-wise);
    ``@token-activations`` builds it with per-token ones (every wgrad on bf16 tensor cores); suffixes combine
    with ``+``, each set inside ``settings`` and put back; the command line takes listed variants and their
    combinations, and rejects the others."""
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, device=None: self)  # stay on the CPU
    monkeypatch.setattr(lowprec.plan.DeviceSpec, "of", classmethod(lambda cls, device: cls("cuda", (9, 0))))

    def plans(model):
        return {name: (m.plan.fprop.kernel, m.plan.dgrad.kernel, m.plan.wgrad.kernel, m.plan.fprop.a.granularity)
                for name, m in model.named_modules() if name in ("blocks.0.attn.q", "blocks.0.ffn.up")}

    model, *_ = bench.build("windowed:paper", TINY)
    assert plans(model) == {"blocks.0.attn.q": ("fp8_tensorwise",) * 3 + ("tensor",),
                            "blocks.0.ffn.up": ("fp8_rowwise", "bf16_tensorcore", "fp8_tensorwise", "tensor")}
    model, *_ = bench.build("windowed:paper@token-activations+e2m1-general", TINY)
    assert plans(model) == {"blocks.0.attn.q": ("fp8_rowwise", "fp8_rowwise", "bf16_tensorcore", "row"),
                            "blocks.0.ffn.up": ("fp8_rowwise", "bf16_tensorcore", "bf16_tensorcore", "row")}
    assert kernels.E2M1_FROM_PASSES and not lowprec.fp8_cast.ROWS_IN_ONE_KERNEL
    with bench.settings("windowed:paper@e2m1-general+rows-one-kernel"):
        assert not kernels.E2M1_FROM_PASSES and lowprec.fp8_cast.ROWS_IN_ONE_KERNEL
    assert kernels.E2M1_FROM_PASSES and not lowprec.fp8_cast.ROWS_IN_ONE_KERNEL
    assert lowprec.gemm.BF16_DGRAD_TAKES_WGRAD_CODES and lowprec.gemm.BF16_DGRAD_FOLDS_GRAD_SCALE
    assert kernels.E2M1_GATHERED_FROM_MASTER
    with bench.settings("windowed:paper@dgrad-requantizes+dgrad-scales-product+e2m1-from-copy"):
        assert not lowprec.gemm.BF16_DGRAD_TAKES_WGRAD_CODES and not lowprec.gemm.BF16_DGRAD_FOLDS_GRAD_SCALE
        assert not kernels.E2M1_GATHERED_FROM_MASTER
    assert lowprec.gemm.BF16_DGRAD_TAKES_WGRAD_CODES and lowprec.gemm.BF16_DGRAD_FOLDS_GRAD_SCALE
    assert kernels.E2M1_GATHERED_FROM_MASTER
    assert lowprec.gemm.RECURRENT_WGRAD_TAKES_STEPS and kernels.PLAIN_CAST_IN_ONE_KERNEL
    with bench.settings("hybrid:paper@lstm-wgrad-requantizes+plain-cast-ops"):
        assert not lowprec.gemm.RECURRENT_WGRAD_TAKES_STEPS and not kernels.PLAIN_CAST_IN_ONE_KERNEL
    assert lowprec.gemm.RECURRENT_WGRAD_TAKES_STEPS and kernels.PLAIN_CAST_IN_ONE_KERNEL
    for bad in ("windowed:paper@e2m1-general+nope", "windowed:paper@+e2m1-general"):
        with pytest.raises(ValueError, match="unknown suffix"):
            with bench.settings(bad):
                pass
    assert bench.variant_name("hybrid:paper@token-activations+e2m1-general") == "hybrid:paper@token-activations+e2m1-general"
    for bad in ("windowed:fp8@e2m1-general", "windowed:paper@token-activations+", "windowed:nope"):
        with pytest.raises(argparse.ArgumentTypeError, match="unknown variant"):
            bench.variant_name(bad)


def test_bf16_parameters_read_the_fp8_weights_from_their_masters(monkeypatch):
    """``--param-dtype bf16`` under the paper policy with Hopper plans: every FP4 E2M1 weight (feed-forward,
    head) and every FP8 one is told it reaches its layer gathered in its format and dequantized to bf16; the
    layers make their operands from the master (``gathered_applies``), but with ``@e2m1-from-copy`` the FP4
    ones' are handed the dequantized tensor."""
    from lowprec.gemm import gathered_applies

    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, device=None: self)  # stay on the CPU
    monkeypatch.setattr(lowprec.plan.DeviceSpec, "of", classmethod(lambda cls, device: cls("cuda", (9, 0))))
    model, *_ = bench.build("windowed:paper", TINY, param_dtype="bf16")
    layers = {name: m for name, m in model.named_modules() if hasattr(m, "plan") and m.precision.weight is not None
              and m.precision.weight.name in ("fp4_e2m1", "fp8_e4m3") and hasattr(m, "gathered_as")}
    fp4 = [n for n, m in layers.items() if m.precision.weight.name == "fp4_e2m1"]
    assert fp4 and "head" in fp4 and any(".ffn." in n for n in fp4) and len(fp4) < len(layers)
    assert all(m.gathered_as is not None for m in layers.values())
    assert all(gathered_applies(m.plan, m.gathered_as) for m in layers.values())
    with bench.settings("windowed:paper@e2m1-from-copy"):
        assert [n for n, m in layers.items() if not gathered_applies(m.plan, m.gathered_as)] == fp4
