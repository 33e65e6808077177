"""What a training run evaluates along the way and at its end (:class:`Evaluation`): validation
loss and bits/char, retrieval accuracy by distance, the end-of-run sample.

The scoring itself is in :mod:`experiments.loop` (``evaluate``, ``evaluate_stream``, ``generate``)
and :mod:`experiments.tasks` (``memory_retrieval_accuracy``); this module picks what a run's config
asks for. A trained checkpoint is scored from the command line by ``python -m experiments.evaluate``.
"""
from __future__ import annotations

import logging

import torch

from .build import Run
from .loop import evaluate, evaluate_stream, generate
from .tasks import memory_retrieval_accuracy, prompt_kwargs, training_row_len

__all__ = ["Evaluation"]

# the training run's logger: its lines read as the run's, whichever module writes them
log = logging.getLogger("experiments.train")


class Evaluation:
    """Validation, retrieval accuracy and the end-of-run sample, all with the model in eval mode."""

    def __init__(self, run: Run):
        self.run, self.t = run, run.train

    def validate(self) -> dict[str, float]:
        """Validation loss and bits/char: streams with carried state after TBPTT training (the first
        ``eval_batches`` segments of each), else ``eval_batches`` batches of fresh windows. On several
        ranks each scores its rows and the sums of nats, tokens and characters are all-reduced."""
        run = self.run
        ranks = {} if run.parallel is None else {"group": run.parallel.dp_group}
        if self.t["tbptt"]:
            s = run.val_windows
            s.load_state_dict(dict(s.state_dict(), epoch=0, segment=0))
            n = min(self.t["eval_batches"], s.segments_per_epoch)
            return evaluate_stream(run.model, s, n, run.data.tokenizer, run.device, **ranks)
        return evaluate(run.model, run.val_windows, run.data.tokenizer, run.device, **ranks)

    def retrieval(self) -> dict[str, dict[int, float]]:
        """Retrieval accuracy by distance (data.retrieval: its first kind, distances, per_bucket, seed)
        with memory on / off / shuffled, read in segments of train.seq_len; a run trained on a retrieval
        task is scored on prompts of its training rows' length. On several ranks every rank scores
        every prompt (the shuffled control rolls the state across a bucket's rows), with the same result."""
        run, t = self.run, self.t
        r = run.data.config.retrieval
        res = memory_retrieval_accuracy(run.model, run.data.tokenizer, distances=list(r.distances),
                                        per_bucket=r.per_bucket, device=run.device, segment=t["seq_len"],
                                        kind=r.kinds[0], seed=r.seed, row_len=training_row_len(t),
                                        **prompt_kwargs(r, run.data.val_tokens))
        for mode, accs in res.items():
            log.info("retrieval (%s, memory %s): %s", r.kinds[0], mode,
                     ", ".join(f"d={d}: {a:.2f}" for d, a in accs.items()))
        return res

    def sample(self) -> str:
        """The end-of-run sample; on several ranks every rank samples (each forward is a collective)
        with the same prompt and seed."""
        t, tok = self.t, self.run.data.tokenizer
        prompt = torch.tensor(tok.encode(t["sample_prompt"] or "\n"), dtype=torch.int64)
        g = torch.Generator().manual_seed(t["seed"])
        ids = generate(self.run.model, prompt, t["sample_tokens"], window=t["seq_len"],
                       temperature=t["sample_temperature"], generator=g)
        return (t["sample_prompt"] or "") + tok.decode(ids.tolist())
