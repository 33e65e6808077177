"""experiments.evaluate: validation, the ModelOpt PTQ baseline beside the checkpoint, retrieval controls."""
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _train(run_dir, *overrides):
    cmd = [sys.executable, "-m", "experiments.train", "model=tiny", "train.steps=6", "train.eval_every=6",
           "train.eval_batches=1", "train.sample_tokens=0", "optim.schedule.warmup_steps=1", "train.progress=false",
           f"hydra.run.dir={run_dir}", *overrides]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("bf16")
    _train(run, "precision=bf16")
    return run


def test_evaluate_ptq_and_retrieval(bf16_run):
    pytest.importorskip("modelopt.torch.quantization")
    from experiments.evaluate import main

    res = main([f"checkpoint={bf16_run}", "ptq=[int8]", "retrieval=true", "distances=[64]", "per_bucket=2",
                "eval_batches=1", "device=cpu"])
    base, ptq = res["rows"]
    assert base["kind"] == "checkpoint" and ptq["kind"] == "post-training" and ptq["precision"] == "int8"
    assert math.isfinite(base["loss"]) and math.isfinite(ptq["loss"])
    assert ptq["loss"] != base["loss"]  # ModelOpt really quantized something
    # int8 weights and activations of a trained tiny model move its loss by well under 5%
    assert abs(ptq["loss"] / base["loss"] - 1) < 0.05
    assert set(res["retrieval"]) == {"on", "off", "shuffled"}
    assert all(set(v) == {64} and 0 <= v[64] <= 1 for v in res["retrieval"].values())
    assert (bf16_run / "evaluation.md").read_text().count("|") > 10


def test_validation_reads_like_the_training_run(bf16_run):
    """A TBPTT run's checkpoint is validated on the same streams, state carried, as during training:
    evaluate's loss is the run's own final validation loss (summary.json), to float rounding
    (both sum the same cross-entropies; 1e-6 relative covers a different summation order)."""
    import json

    from experiments.evaluate import main

    res = main([f"checkpoint={bf16_run}", "device=cpu"])  # eval_batches: the run's own (1)
    summary = json.loads((bf16_run / "summary.json").read_text())
    assert res["rows"][0]["loss"] == pytest.approx(summary["val_loss"], rel=1e-6)


def test_ptq_refuses_a_natively_quantized_checkpoint(tmp_path):
    from experiments.evaluate import load_run

    _train(tmp_path, "precision=ternary_native", "optim=ternary_native")
    with pytest.raises(ValueError, match="unquantized"):
        load_run(tmp_path, plain=True)


def test_missing_checkpoint(tmp_path):
    from experiments.evaluate import resolve_checkpoint

    with pytest.raises(FileNotFoundError, match="no valid checkpoint"):
        resolve_checkpoint(tmp_path)


def test_backend_override_and_bad_backend(bf16_run, tmp_path):
    """backend= forces every quantized layer of the loaded runs onto one GEMM backend."""
    from experiments.evaluate import load_run, main

    fp8_run = tmp_path / "fp8"
    _train(fp8_run, "precision=fp8")
    model, _, _ = load_run(fp8_run, "cpu", backend="emulated")
    qlayers = [m for m in model.modules() if hasattr(m, "precision") and m.precision.is_quantized]
    assert qlayers and all(m.precision.backend == "emulated" for m in qlayers)
    with pytest.raises(SystemExit, match=r"unknown backend='fast'; choose one of \('emulated', 'tensorcore', 'auto'\)"):
        main([f"checkpoint={bf16_run}", "backend=fast"])
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        load_run(fp8_run, "cpu", backend="fast")
