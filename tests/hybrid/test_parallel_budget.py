"""hybrid.parallel_budget: per-GPU training memory under FSDP x TP, and the smallest layout."""
from pathlib import Path

import pytest
import yaml

import lowprec
from hybrid import param_counts, preset
from hybrid.parallel_budget import GB, Layout, gpu_budget, smallest_layout

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def policy(name):
    return lowprec.PrecisionPolicy.from_config(yaml.safe_load((CONFIGS / "precision" / f"{name}.yaml").read_text()))


def test_states_are_counted_once_over_all_gpus():
    """Weights, gradients and optimizer state are sharded: summed over the dp x tp GPUs they are the
    1-GPU amounts (bf16 policy: fp32 masters, fp32 grads, AdamW's two fp32 moments)."""
    cfg = preset("paper")
    n = sum(param_counts(cfg).values())
    one = gpu_budget(cfg, policy("bf16"), Layout(1, 1), window=1024)
    # float sums of per-layer byte counts of a 392.73B model: 1e-9 relative is a few hundred bytes
    assert one.parts["weights"] == pytest.approx(4 * n, rel=1e-9)
    assert one.parts["grads"] == pytest.approx(4 * n, rel=1e-9)
    assert one.parts["optimizer"] == pytest.approx(8 * n, rel=1e-9)
    many = gpu_budget(cfg, policy("bf16"), Layout(16, 8), window=1024)
    for k in ("weights", "grads", "optimizer"):
        assert many.parts[k] < one.parts[k] / 16


def test_native_weights_are_stored_packed():
    """ternary_native: the blocks' and LSTM's weights at 2 bits (+ one scale), not a float master."""
    cfg = preset("paper")
    assert gpu_budget(cfg, policy("ternary_native"), Layout(1, 1), window=1024).parts["weights"] < \
        gpu_budget(cfg, policy("ternary"), Layout(1, 1), window=1024).parts["weights"] / 10


@pytest.mark.parametrize("name", ["paper", "ternary_native"])
def test_smallest_layout_is_smallest(name):
    cfg, pol = preset("paper"), policy(name)
    best = smallest_layout(cfg, pol, window=16384)
    cap = 76 * GB
    assert best.total <= cap
    assert gpu_budget(cfg, pol, Layout(best.layout.dp - 1, best.layout.tp), window=16384).total > cap


def test_the_full_window_does_not_fit_one_sequence_per_gpu_group():
    """At T = 131072 the checkpointed inputs of 146 units alone (146 x T x d x 2 B = 627 GB) exceed
    8 GPUs' share: no layout with tp <= 8."""
    assert smallest_layout(preset("paper"), policy("paper")) is None
