"""Evaluate checkpoints: validation loss / bits per char, long-context retrieval with memory
controls, and the post-training-quantization baseline beside natively trained models.

    python -m experiments.evaluate checkpoint=runs/a/checkpoints/ckpt-300.pt
    python -m experiments.evaluate checkpoint=RUN_BF16 ptq=[fp8,int8,int4] compare=[RUN_FP8,RUN_TERNARY]
    python -m experiments.evaluate checkpoint=RUN retrieval=true distances=[64,256,1024] per_bucket=10

``checkpoint``: a checkpoint file or a run directory (its newest valid checkpoint).
- Validation: independent windows of the validation split (``eval_batches`` x the run's batch).
- ``ptq``: the checkpoint's model rebuilt with plain float layers (it must have been trained with
  unquantized weights, e.g. ``precision=bf16``), quantized afterwards with NVIDIA ModelOpt
  (:mod:`experiments.ptq`), evaluated on the same windows.
- ``compare``: other checkpoints (trained natively in a precision) evaluated on the same windows.
- ``retrieval``: passkey accuracy by distance, the prompt streamed segment by segment with the
  state carried, then greedy decoding; three controls: memory ``on``; ``off`` (the carried state is
  dropped before every segment: a windowed model); ``shuffled`` (the state carried into the last
  segment comes from another example's prompt).
Writes ``evaluation.json`` and ``evaluation.md`` next to the checkpoint's run directory.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .checkpoint import CheckpointManager, load_checkpoint
from .loop import evaluate

log = logging.getLogger(__name__)
ARGS = {"checkpoint", "ptq", "compare", "retrieval", "distances", "per_bucket", "eval_batches", "device"}


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the newest valid checkpoint of a run directory."""
    path = Path(path)
    if path.is_dir():
        ckpts = CheckpointManager(path / "checkpoints" if (path / "checkpoints").is_dir() else path)
        found = ckpts.latest_valid()
        if found is None:
            raise FileNotFoundError(f"no valid checkpoint in {str(path)!r}")
        path = found[0]
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    return path


def load_run(path: str | Path, device: str = "cpu", *, plain: bool = False):
    """(model, data, cfg) of a checkpoint. ``plain``: build the model without its precision policy
    (plain nn.Linear/nn.Embedding) and load the float weights into it (for PTQ)."""
    from hybrid import HybridConfig, HybridLM

    from .build import _model_config, _vocab_size, check_train
    from .data import DataConfig, prepare_data

    payload = load_checkpoint(resolve_checkpoint(path))
    cfg = OmegaConf.create(payload["config"])
    t = check_train(cfg.train)
    data_cfg = DataConfig.from_config(cfg.data)
    data = prepare_data(data_cfg, batch_size=t["batch_size"], seq_len=t["seq_len"])
    model = HybridLM(_model_config(cfg, _vocab_size(data_cfg)))
    if not plain:
        import lowprec

        lowprec.apply_policy(model, lowprec.PrecisionPolicy.from_config(cfg.precision))
        model.load_state_dict(payload["model"])
    else:
        state = {k: v for k, v in payload["model"].items() if k in model.state_dict()}
        missing = set(model.state_dict()) - set(state)
        if missing:
            raise ValueError(f"checkpoint {path} has no float weights for {sorted(missing)[:4]}...: PTQ needs a model "
                             "trained with unquantized (latent) weights, e.g. precision=bf16")
        model.load_state_dict({k: v.float() for k, v in state.items()})
    assert isinstance(model.cfg, HybridConfig)
    return model.to(device).eval(), data, cfg


@torch.no_grad()
def _run(model, ids: torch.Tensor, state, *, carry: bool = True):
    """Feed ``ids`` (1, N) segment by segment; returns (logits (1, N, V), state).
    ``carry=False`` drops the state before every segment (a windowed model)."""
    L = model.cfg.window
    outs = []
    for s in range(0, ids.shape[1], L):
        logits, state = model(ids[:, s:s + L], state if carry else None)
        outs.append(logits)
    return (torch.cat(outs, dim=1) if outs else None), state


@torch.no_grad()
def retrieval_accuracy(model, tokenizer, *, distances, per_bucket, device, seed=0) -> dict[str, dict[int, float]]:
    """{control: {distance: accuracy}} for the passkey task with memory ``on`` / ``off`` / ``shuffled``.

    Scored by teacher forcing: the prompt plus the answer's first k-1 tokens go in, and an example
    counts as correct iff the argmax at each of the k answer positions is the answer token — which
    is exactly when greedy decoding would produce the answer. The segment holding the first answer
    position starts at ``cut``; ``shuffled`` replaces the state carried into it by the state of
    another prompt of the same distance bucket (read up to the same point)."""
    from .tasks import retrieval_examples

    examples = retrieval_examples(tokenizer, "passkey", distances=distances, per_bucket=per_bucket, seed=seed)
    L = model.cfg.window
    out: dict[str, dict[int, float]] = {}
    for mode in ("on", "off", "shuffled"):
        hits: dict[int, list[int]] = {}
        for i, ex in enumerate(examples):
            answer = list(ex.answer_ids)
            ids = torch.tensor([list(ex.prompt_ids) + answer[:-1]], device=device)
            first = len(ex.prompt_ids) - 1  # the position whose prediction is answer[0]
            cut = first // L * L
            if mode == "shuffled" and cut:
                j = i + 1 if (i + 1) % per_bucket else i - per_bucket + 1  # a neighbour in the same bucket
                other = torch.tensor([list(examples[j].prompt_ids)], device=device)
                _, state = _run(model, other[:, :min(cut, other.shape[1] // L * L)], None)
                if state is not None:
                    state.pos = cut
            else:
                _, state = _run(model, ids[:, :cut], None, carry=mode != "off") if cut else (None, None)
            logits, _ = _run(model, ids[:, cut:], state if mode != "off" else None, carry=mode != "off")
            pred = logits[0, first - cut:first - cut + len(answer)].argmax(-1).tolist()
            hits.setdefault(ex.distance, []).append(int(pred == answer))
        out[mode] = {d: sum(v) / len(v) for d, v in sorted(hits.items())}
    return out


def main(argv=None) -> dict:
    args = OmegaConf.from_dotlist(list(sys.argv[1:] if argv is None else argv))
    unknown = set(args) - ARGS
    if unknown or "checkpoint" not in args:
        raise SystemExit(f"usage: python -m experiments.evaluate checkpoint=PATH [key=value ...]; keys {sorted(ARGS)}"
                         + (f"; unknown {sorted(unknown)}" if unknown else ""))
    device = args.get("device", "cuda" if torch.cuda.is_available() else "cpu")
    model, data, cfg = load_run(args.checkpoint, device)
    B, T = int(cfg.train.batch_size), int(min(cfg.train.seq_len, model.cfg.window))
    windows = list(data.val_windows(B, T, int(args.get("eval_batches", 8))))
    rows = [("checkpoint", str(resolve_checkpoint(args.checkpoint)), cfg.precision.get("name", "?"),
             evaluate(model, windows, data.tokenizer, device))]
    for recipe in args.get("ptq", []) or []:
        from .ptq import quantize_post_training

        plain, _, _ = load_run(args.checkpoint, device, plain=True)
        q = quantize_post_training(plain, recipe, [x.to(device) for x, _ in windows[:4]], forward=lambda m, b: m(b))
        rows.append(("post-training", f"{recipe} (ModelOpt) of the checkpoint", recipe, evaluate(q, windows, data.tokenizer, device)))
    for other in args.get("compare", []) or []:
        m2, _, cfg2 = load_run(other, device)
        rows.append(("trained natively", str(resolve_checkpoint(other)), cfg2.precision.get("name", "?"),
                     evaluate(m2, windows, data.tokenizer, device)))
    result = {"rows": [{"kind": k, "what": w, "precision": p, **v} for k, w, p, v in rows]}
    if args.get("retrieval"):
        result["retrieval"] = retrieval_accuracy(model, data.tokenizer, distances=list(args.get("distances", [64, 256, 1024])),
                                                 per_bucket=int(args.get("per_bucket", 5)), device=device)
    md = ["| kind | model | precision | val loss (nats/token) | bits/char |", "|---|---|---|---|---|"]
    md += [f"| {r['kind']} | {r['what']} | {r['precision']} | {r['loss']:.4f} | {r['bpc']:.4f} |" for r in result["rows"]]
    if "retrieval" in result:
        ds = sorted({d for v in result["retrieval"].values() for d in v})
        md += ["", "| memory | " + " | ".join(f"d={d}" for d in ds) + " |", "|---|" + "---|" * len(ds)]
        md += [f"| {m} | " + " | ".join(f"{acc[d]:.2f}" for d in ds) + " |" for m, acc in result["retrieval"].items()]
    text = "\n".join(md)
    out_dir = resolve_checkpoint(args.checkpoint).parent.parent
    (out_dir / "evaluation.json").write_text(json.dumps(result, indent=2, default=str))
    (out_dir / "evaluation.md").write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
