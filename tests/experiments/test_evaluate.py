"""experiments.evaluate: validation, the ModelOpt PTQ baseline beside the checkpoint, retrieval controls.

The checkpoints are tiny runs trained in this process once per session (conftest.trained_run).
"""
import json
import math

import pytest

from experiments.evaluate import load_run, main

SHORT = ("train.steps=6", "train.sample_tokens=0")


@pytest.fixture
def bf16_run(trained_run):
    return trained_run("precision=bf16", *SHORT)


def test_evaluate_ptq_and_retrieval(bf16_run):
    pytest.importorskip("modelopt.torch.quantization")
    res = main([f"checkpoint={bf16_run}", "ptq=[int8]", "retrieval=true", "distances=[64]", "per_bucket=2",
                "eval_batches=1", "device=cpu"])
    base, ptq = res["rows"]
    assert base["kind"] == "checkpoint" and ptq["kind"] == "post-training" and ptq["precision"] == "int8"
    assert math.isfinite(base["loss"]) and math.isfinite(ptq["loss"])
    assert ptq["loss"] != base["loss"]  # ModelOpt really quantized something
    # int8 weights and activations of a trained tiny model move its loss by well under 5%
    assert abs(ptq["loss"] / base["loss"] - 1) < 0.05
    # a 6-step byte model cannot name 5 random digits (chance 1e-5 per prompt): any credit here
    # would come from the scoring, not the model (the scoring's 1s are checked with an oracle in
    # test_retrieval_training.py)
    assert res["retrieval"] == {"on": {64: 0.0}, "off": {64: 0.0}, "shuffled": {64: 0.0}}
    md = (bf16_run / "evaluation.md").read_text()
    assert "| post-training | int8 (ModelOpt) of the checkpoint | int8 |" in md and "| memory | d=64 |" in md


def test_validation_reads_like_the_training_run(bf16_run):
    """A TBPTT run's checkpoint is validated on the same streams, state carried, as during training:
    evaluate's loss is the run's own final validation loss (summary.json), to float rounding
    (both sum the same cross-entropies; 1e-6 relative covers a different summation order)."""
    res = main([f"checkpoint={bf16_run}", "device=cpu"])  # eval_batches: the run's own (2)
    summary = json.loads((bf16_run / "summary.json").read_text())
    assert res["rows"][0]["loss"] == pytest.approx(summary["val_loss"], rel=1e-6)


@pytest.fixture
def ternary_native_run(trained_run):
    return trained_run("precision=ternary_native", "optim=ternary_native", *SHORT)


def test_ptq_refuses_a_natively_quantized_checkpoint(ternary_native_run):
    with pytest.raises(ValueError, match="unquantized"):
        load_run(ternary_native_run, plain=True)


def test_backend_override_and_bad_backend(bf16_run, ternary_native_run):
    """backend= forces every quantized layer of the loaded runs onto one GEMM backend."""
    model, _, _ = load_run(ternary_native_run, "cpu", backend="emulated")
    qlayers = [m for m in model.modules() if hasattr(m, "precision") and m.precision.is_quantized]
    assert qlayers and all(m.precision.backend == "emulated" for m in qlayers)
    with pytest.raises(SystemExit, match=r"unknown backend='fast'; choose one of \('emulated', 'tensorcore', 'auto'\)"):
        main([f"checkpoint={bf16_run}", "backend=fast"])
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        load_run(ternary_native_run, "cpu", backend="fast")
