"""The post-training-quantization baseline: a model trained in bf16/fp32, quantized afterwards
with NVIDIA ModelOpt (``nvidia-modelopt``), to compare against the same model trained natively in
that precision — the paper's claim, measured.

Recipes (ModelOpt configs; what they quantize):

========  =================================  ==============================================
name      ModelOpt config                    weights / activations
========  =================================  ==============================================
fp8       ``FP8_DEFAULT_CFG``                E4M3 per-tensor / E4M3 per-tensor (calibrated)
int8      ``INT8_DEFAULT_CFG``               int8 per-channel / int8 per-tensor (calibrated)
int4      ``INT4_BLOCKWISE_WEIGHT_ONLY_CFG`` int4 blocks of 128 / none
nvfp4     ``NVFP4_DEFAULT_CFG``              NVFP4 / NVFP4 (needs CUDA: ModelOpt's kernels)
========  =================================  ==============================================

Calibration runs the model over a few training batches (``forward_loop``). ModelOpt swaps every
``nn.Linear`` for its fake-quantized version, so the model must hold plain float layers: build it
without a precision policy (or with ``precision=bf16`` and then fold back), load the weights, call
:func:`quantize_post_training`.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch

RECIPES = {
    "fp8": "FP8_DEFAULT_CFG",
    "int8": "INT8_DEFAULT_CFG",
    "int4": "INT4_BLOCKWISE_WEIGHT_ONLY_CFG",
    "nvfp4": "NVFP4_DEFAULT_CFG",
}
NEEDS_CUDA = {"nvfp4"}


def check_ptq_support(recipe: str, device: torch.device) -> tuple[bool, str]:
    """(supported, reason) for running ``recipe`` on ``device``."""
    if recipe not in RECIPES:
        return False, f"unknown PTQ recipe {recipe!r}; choose one of {', '.join(RECIPES)}"
    try:
        import modelopt.torch.quantization  # noqa: F401  (the optional [ptq] extra)
    except ImportError as e:
        return False, f"nvidia-modelopt is not importable ({e}); pip install 'lowprec[ptq]'"
    if recipe in NEEDS_CUDA and torch.device(device).type != "cuda":
        return False, f"ModelOpt's {recipe} needs CUDA (its kernels); run on a GPU"
    return True, "ok"


def quantize_post_training(model: torch.nn.Module, recipe: str, calibration: Iterable[torch.Tensor],
                           forward: Callable[[torch.nn.Module, torch.Tensor], object] | None = None) -> torch.nn.Module:
    """A quantized copy of ``model`` (the original is untouched), calibrated on ``calibration``
    (token batches). ``forward(model, batch)`` runs one batch (default: ``model(batch)``)."""
    device = next(model.parameters()).device
    ok, why = check_ptq_support(recipe, device)
    if not ok:
        raise ValueError(why)
    import modelopt.torch.quantization as mtq  # the optional [ptq] extra, checked just above

    batches = list(calibration)
    if not batches:
        raise ValueError("PTQ calibration needs at least one batch")
    run = forward or (lambda m, b: m(b))

    def forward_loop(m):
        with torch.no_grad():
            for b in batches:
                run(m, b)

    q = copy.deepcopy(model).eval()
    return mtq.quantize(q, getattr(mtq, RECIPES[recipe]), forward_loop)
