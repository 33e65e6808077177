"""Evaluate checkpoints: validation loss / bits per char, long-context retrieval with memory
controls, and the post-training-quantization baseline beside natively trained models.

    python -m experiments.evaluate checkpoint=runs/a/checkpoints/ckpt-300.pt
    python -m experiments.evaluate checkpoint=RUN_BF16 ptq=[fp8,int8,int4] compare=[RUN_FP8,RUN_TERNARY]
    python -m experiments.evaluate checkpoint=RUN retrieval=true distances=[64,256,1024] per_bucket=10

``checkpoint``: a checkpoint file or a run directory (its newest valid checkpoint). A run trained on
several processes ends with its newest sharded checkpoint exported as ``ckpt-<step>.pt``; a sharded
checkpoint directory ``dcp-<step>/`` (or a run directory whose newest checkpoint is one) is exported
so first, beside it.
- Validation: read as the run was validated while training: for a TBPTT run the first
  ``eval_batches`` segments of the run's batch of validation streams, state carried (the same
  numbers as its TensorBoard ``val/loss``); otherwise ``eval_batches`` independent windows.
- ``ptq``: the checkpoint's model rebuilt with plain float layers (it must have been trained with
  unquantized weights, e.g. ``precision=bf16``), quantized afterwards with NVIDIA ModelOpt
  (:mod:`experiments.ptq`, calibrated on the first 4 validation batches), evaluated on the same data.
- ``compare``: other checkpoints (trained natively in a precision) evaluated on the same data.
- ``backend``: emulated | tensorcore | auto for every quantized layer of the checkpoint and the
  compared ones (default: each run's own policy). All three compute the policy's formats
  (``emulated`` is the exact reference; see :mod:`lowprec.plan`).
- ``retrieval``: accuracy by distance on ``kind`` (passkey or kv), each prompt read in segments
  of the run's ``train.seq_len`` with the state carried, scored as greedy decoding would answer;
  three controls: memory ``on``; ``off`` (the carried state is dropped before every segment: a
  windowed model); ``shuffled`` (the state carried into the answer's segment comes from another
  prompt of the same distance). See :func:`experiments.tasks.memory_retrieval_accuracy`.
Writes ``evaluation.json`` and ``evaluation.md`` next to the checkpoint's run directory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

import lowprec
from hybrid import HybridLM

from .build import check_train, model_config, vocab_size
from .checkpoint import CheckpointManager, load_checkpoint, resolve_checkpoint
from .data import DataConfig, SegmentStreamer, prepare_data
from .loop import evaluate, evaluate_stream
from .sharded_checkpoint import export_single_file, sharded_checkpoints
from .tasks import memory_retrieval_accuracy, prompt_kwargs, training_row_len

ARGS = {"checkpoint", "ptq", "compare", "retrieval", "kind", "distances", "per_bucket", "eval_batches", "device",
        "backend"}
BACKENDS = ("emulated", "tensorcore", "auto")


def locate_checkpoint(path: str | Path) -> Path:
    """The checkpoint file ``path`` names: a file as given; a run directory's newest valid one; a
    sharded checkpoint directory, or a run directory whose newest checkpoint is sharded, exported to
    ``ckpt-<step>.pt`` beside it first (once)."""
    p = Path(path)
    if p.is_dir() and (p / ".metadata").exists():
        return _exported(p)
    if p.is_dir():
        d = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        sharded, files = sharded_checkpoints(d), CheckpointManager(d).checkpoints()
        if sharded and (not files or sharded[-1][0] > files[-1][0]):
            return _exported(sharded[-1][1])
    return resolve_checkpoint(p)


def _exported(dcp_dir: Path) -> Path:
    out = dcp_dir.parent / f"ckpt-{int(dcp_dir.name.rsplit('-', 1)[-1]):08d}.pt"
    return out if out.exists() else export_single_file(dcp_dir, out)


def load_run(path: str | Path, device: str = "cpu", *, plain: bool = False, backend: str | None = None):
    """(model, data, cfg) of a checkpoint, computing as the run did (its policy, its
    ``parallel.param_dtype``). ``plain``: build the model without its precision policy
    (plain nn.Linear/nn.Embedding) and load the float weights into it (for PTQ). ``backend``: run
    every quantized layer on this GEMM backend instead of the policy's (``emulated`` is the exact
    reference everywhere)."""
    payload = load_checkpoint(locate_checkpoint(path))
    cfg = OmegaConf.create(payload["config"])
    t = check_train(cfg.train)
    data_cfg = DataConfig.from_config(cfg.data)
    data = prepare_data(data_cfg, batch_size=t["batch_size"], seq_len=t["seq_len"])
    model = HybridLM(model_config(cfg, vocab_size(data_cfg)))
    if not plain:
        policy = OmegaConf.to_container(cfg.precision, resolve=True)
        if backend is not None:
            if backend not in BACKENDS:
                raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
            extra = policy.get("override") or []
            policy["override"] = [*(extra if isinstance(extra, list) else [extra]), {"match": "*", "backend": backend}]
        lowprec.apply_policy(model, lowprec.PrecisionPolicy.from_config(policy))
        model.load_state_dict(payload["model"])
        param_dtype = (cfg.get("parallel") or {}).get("param_dtype")
        if param_dtype:  # the run computed in it (one process or many): so does its evaluation
            from .parallel import DTYPES, compute_in_param_dtype

            compute_in_param_dtype(model, DTYPES[param_dtype])
    else:
        state = {k: v for k, v in payload["model"].items() if k in model.state_dict()}
        missing = set(model.state_dict()) - set(state)
        if missing:
            raise ValueError(f"checkpoint {path} has no float weights for {sorted(missing)[:4]}...: PTQ needs a model "
                             "trained with unquantized (latent) weights, e.g. precision=bf16")
        model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.to(device).eval(), data, cfg


def main(argv=None) -> dict:
    args = OmegaConf.from_dotlist(list(sys.argv[1:] if argv is None else argv))
    unknown = set(args) - ARGS
    if unknown or "checkpoint" not in args:
        raise SystemExit(f"usage: python -m experiments.evaluate checkpoint=PATH [key=value ...]; keys {sorted(ARGS)}"
                         + (f"; unknown {sorted(unknown)}" if unknown else ""))
    device = args.get("device", "cuda" if torch.cuda.is_available() else "cpu")
    backend = args.get("backend")
    if backend is not None and backend not in BACKENDS:
        raise SystemExit(f"unknown backend={backend!r}; choose one of {BACKENDS}")
    model, data, cfg = load_run(args.checkpoint, device, backend=backend)
    B, T = int(cfg.train.batch_size), int(min(cfg.train.seq_len, model.cfg.window))
    n_batches = int(args.get("eval_batches", cfg.train.eval_batches))
    if cfg.train.get("tbptt", True):  # as the run validated itself: streams, state carried
        def streamer():
            return SegmentStreamer(data.val_tokens, B, T, int(cfg.train.seed))

        n_batches = min(n_batches, streamer().segments_per_epoch)
        first = streamer()
        calibration = [next(first)[0] for _ in range(min(4, n_batches))]
        score = lambda m: evaluate_stream(m, streamer(), n_batches, data.tokenizer, device)  # noqa: E731
    else:
        windows = list(data.val_windows(B, T, n_batches))
        calibration = [x for x, _ in windows[:4]]
        score = lambda m: evaluate(m, windows, data.tokenizer, device)  # noqa: E731
    rows = [("checkpoint", str(locate_checkpoint(args.checkpoint)), cfg.precision.get("name", "?"), score(model))]
    for recipe in args.get("ptq", []) or []:
        from .ptq import quantize_post_training  # the optional [ptq] extra: imported only when asked for

        plain, _, _ = load_run(args.checkpoint, device, plain=True)
        q = quantize_post_training(plain, recipe, [x.to(device) for x in calibration], forward=lambda m, b: m(b))
        rows.append(("post-training", f"{recipe} (ModelOpt) of the checkpoint", recipe, score(q)))
    for other in args.get("compare", []) or []:
        m2, _, cfg2 = load_run(other, device, backend=backend)
        rows.append(("trained natively", str(locate_checkpoint(other)), cfg2.precision.get("name", "?"), score(m2)))
    result = {"rows": [{"kind": k, "what": w, "precision": p, **v} for k, w, p, v in rows]}
    if args.get("retrieval"):
        result["retrieval"] = memory_retrieval_accuracy(  # with the run's digits, records and filler
            model, data.tokenizer, distances=list(args.get("distances", [64, 256, 1024])),
            per_bucket=int(args.get("per_bucket", 5)), device=device, segment=T, kind=str(args.get("kind", "passkey")),
            row_len=training_row_len(cfg.train), **prompt_kwargs(data.config.retrieval, data.val_tokens))
    md = ["| kind | model | precision | val loss (nats/token) | bits/char |", "|---|---|---|---|---|"]
    md += [f"| {r['kind']} | {r['what']} | {r['precision']} | {r['loss']:.4f} | {r['bpc']:.4f} |" for r in result["rows"]]
    if "retrieval" in result:
        ds = sorted({d for v in result["retrieval"].values() for d in v})
        md += ["", "| memory | " + " | ".join(f"d={d}" for d in ds) + " |", "|---|" + "---|" * len(ds)]
        md += [f"| {m} | " + " | ".join(f"{acc[d]:.2f}" for d in ds) + " |" for m, acc in result["retrieval"].items()]
    text = "\n".join(md)
    out_dir = locate_checkpoint(args.checkpoint).parent.parent
    (out_dir / "evaluation.json").write_text(json.dumps(result, indent=2, default=str))
    (out_dir / "evaluation.md").write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
