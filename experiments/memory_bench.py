"""Memory of one training step per optimizer recipe, against bf16 AdamW: ``python -m experiments.memory_bench``.

For each case a real model (``hybrid.HybridLM(hybrid.preset(...))``) gets a precision policy and an
optimizer config from ``configs/``, takes one warm-up step (optimizer state is allocated at the first step), then one
measured step. Printed, as markdown rows for ``docs/benchmarks.md``:

- ``resident B/param``: :func:`optim.memory_report` (weights + optimizer state, actual storages);
- ``at step B/param``: the same + the gradients a step holds (0 for native layers updated in backward);
- on CUDA: ``torch.cuda.memory_allocated`` after the step (everything resident between steps) and
  ``torch.cuda.max_memory_allocated`` during it (activations, gradients and transients included),
  and the peak relative to the bf16 AdamW baseline.

Also on CUDA, ``unaccounted``: memory allocated after the step minus what was allocated before the
model (cuBLAS workspaces of the forward and backward threads), the report's resident bytes and the
batch of tokens. When the report counts every tensor that survives the step, it is the CUDA
allocator's rounding of each of the model's ``tensors`` (storages) up to whole 512-byte blocks,
less the report's host-side tensors (AdamW's 0-d ``step`` counters live on the CPU).

Cases: bf16 AdamW (fp32 master and moments: 16 B/param at the step); native binary + Bop,
native ternary + TernaryBop and native FP8 + SRAdamW with fp8 moments, each with the update after
backward and inside backward. A native layer's quantized operands live from its forward to the
end of its backward, shared by every call of the step, and nothing of them survives the step.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import hybrid
import lowprec
from optim import build_optimizer, memory_report

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# name -> (precision config or dict, optimizer config, overrides of the optimizer config)
CASES = {
    "bf16 + AdamW (fp32 master, moments)": ("bf16", "adamw", {}),
    "binary native + Bop": ("binary_native", "binary_native", {}),
    "binary native + Bop, in backward": ("binary_native", "binary_native", {"in_backward": True}),
    "ternary native + TernaryBop": ("ternary_native", "ternary_native", {}),
    "ternary native + TernaryBop, in backward": ("ternary_native", "ternary_native", {"in_backward": True}),
    "fp8 native + SRAdamW fp8 moments": ("fp8_native", "sr_adamw", {}),
    "fp8 native + SRAdamW fp8 moments, in backward": ("fp8_native", "sr_adamw", {"in_backward": True}),
}


def policy_config(name: str):
    if name == "fp8_native":  # configs/precision/fp8.yaml with every weight native
        cfg = OmegaConf.load(CONFIGS / "precision" / "fp8.yaml")
        cfg.name = "fp8_native"
        cfg.default.storage = "native"
        return cfg
    return OmegaConf.load(CONFIGS / "precision" / f"{name}.yaml")


def _device_storages(model, device) -> int:
    """Distinct storages of the model on ``device``: parameters, buffers, gradient carriers."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [m._grad_carrier for m in model.modules() if getattr(m, "is_native", False)]
    return len({t.untyped_storage().data_ptr() for t in tensors if t.device.type == device.type})


def cuda_baseline(device) -> int:
    """Bytes allocated before any model exists, once cuBLAS has made its workspaces for the forward
    thread and autograd's backward thread (fp32, bf16 and FP8 GEMMs): what every case shares."""
    fp8 = lowprec.LayerPrecision.from_fields({"weight": "fp8_e4m3", "input": {"format": "fp8_e4m3", "granularity": "tensor"},
                                              "grad": {"format": "fp8_e5m2", "granularity": "tensor"}})
    for dtype in (torch.float32, torch.bfloat16):
        layers = [torch.nn.Linear(64, 64, device=device, dtype=dtype)]
        if dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 9):
            layers.append(lowprec.nn.QLinear(64, 64, precision=fp8, device=device, dtype=dtype))
        for layer in layers:
            layer(torch.randn(64, 64, device=device, dtype=dtype, requires_grad=True)).sum().backward()
        del layers
    torch.cuda.synchronize()
    gc.collect()
    return torch.cuda.memory_allocated()


def run_case(name, preset, device, batch, seq, baseline=0):
    policy, optim_cfg, overrides = CASES[name]
    torch.manual_seed(0)
    model = hybrid.HybridLM(hybrid.preset(preset))
    lowprec.apply_policy(model, policy_config(policy))
    model.to(device)
    cfg = OmegaConf.merge(OmegaConf.load(CONFIGS / "optim" / f"{optim_cfg}.yaml"), overrides)
    opt = build_optimizer(model, cfg)
    vocab = model.cfg.vocab_size
    tokens = torch.randint(0, vocab, (batch, seq), device=device)

    def step():
        logits, _ = model(tokens)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens.reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # allocates optimizer state
    report = memory_report(model, opt)
    row = {"case": name, "params": report.total.params, "resident": report.total.resident_per_param,
           "at_step": report.total.step_per_param}
    if device.type == "cuda":
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        row["allocated_mib"] = torch.cuda.memory_allocated() / 2**20
        row["unaccounted"] = (torch.cuda.memory_allocated() - baseline - report.total.resident_bytes
                              - tokens.numel() * tokens.element_size())
        row["tensors"] = _device_storages(model, device)
        row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        row["before_mib"] = before / 2**20
    del model, opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="medium", help="hybrid preset (default: medium, 28.6M params)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", nargs="*", default=list(CASES), help="subset of the case names")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"`python -m experiments.memory_bench {' '.join(sys.argv[1:] if argv is None else argv)}` — model "
          f"{args.preset}, batch {args.batch} x {args.seq} tokens, {where}, torch {torch.__version__}, "
          f"{datetime.date.today().isoformat()}\n")
    head = "| case | params | resident B/param | at step B/param |"
    if device.type == "cuda":
        head += " allocated after step (MiB) | unaccounted (B) | tensors | peak in step (MiB) | peak / bf16 AdamW |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    base_peak = None
    baseline = cuda_baseline(device) if device.type == "cuda" else 0
    for name in args.cases:
        try:
            r = run_case(name, args.preset, device, args.batch, args.seq, baseline)
        except Exception as e:  # one failing case must not hide the others' rows
            print(f"| {name} | failed: {type(e).__name__}: {str(e)[:200]} |", flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        line = f"| {r['case']} | {r['params']:,} | {r['resident']:.3f} | {r['at_step']:.3f} |"
        if "peak_mib" in r:
            base_peak = base_peak or r["peak_mib"]
            line += (f" {r['allocated_mib']:.1f} | {r['unaccounted']:,} | {r['tensors']} | {r['peak_mib']:.1f} "
                     f"| {r['peak_mib'] / base_peak:.3f} |")
        print(line, flush=True)


if __name__ == "__main__":
    main()
