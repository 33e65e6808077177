"""One training step, evaluation and sampling for a `HybridLM` (or any ``model(x, state)``).

A step (``Stepper.step``) reads its tokens from one of two sources:

- TBPTT (``tbptt=True``): a ``SegmentStreamer``'s B contiguous streams, ``k`` segments (B, T) per
  step, in order. The hybrid state is carried from segment to segment, cut from the graph
  (``state.detach()``) at the start of every step, and dropped where the streamer says
  ``reset`` (a new epoch). Gradients flow through at most ``k`` segments.
- windows (``tbptt=False``): a ``TokenBatcher``'s random windows (B, T), each from a fresh state.

Loss (nats/token) over the step's ``n = k·B·T`` targets, then the loss-scaled update::

    loss  = (1/n) Σ CE(logits, y)
    (S·loss).backward()                   S: the LossScaler's scale (1 when scaling is off)
    g     ← g / S;  skip if any g is inf/NaN (scaler)
    g     ← g · min(1, c / ‖g‖₂)            clipping at c = grad_clip (‖g‖ over every gradient, native ones too)
    step, then the schedule (taken steps only: a skipped step leaves both untouched)

Evaluation scores validation windows, each from a fresh state (``evaluate``), or, for a model
trained with carried state, the validation split read as B contiguous streams with the state
carried (``evaluate_stream``); both report
``loss = Σ nats / Σ targets`` and ``bpc = Σ nats / (Σ chars · ln 2)`` where the characters under
the targets are counted exactly by the tokenizer.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from hybrid import HybridState

__all__ = ["StepResult", "Stepper", "evaluate", "evaluate_stream", "generate", "clip_grads_", "nonfinite_tensors"]


@dataclass
class StepResult:
    loss: float            # mean nats/token of the step (NaN/inf on a bad step)
    tokens: int            # targets in the step
    grad_norm: float       # ‖g‖₂ after unscaling, before clipping (inf/NaN on a bad step)
    taken: bool            # False: the scaler skipped the update
    loss_scale: float      # the scale used for this step's backward
    seconds: float


def clip_grads_(grads: list[torch.Tensor], max_norm: float | None) -> float:
    """‖g‖₂ over ``grads``; scale them in place to norm ``max_norm`` when it is larger (and finite)."""
    if not grads:
        return 0.0
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
    if max_norm and math.isfinite(norm) and norm > max_norm:
        torch._foreach_mul_(grads, max_norm / (norm + 1e-6))
    return norm


def nonfinite_tensors(model: nn.Module) -> list[str]:
    """Names of parameters and buffers holding NaN/inf (floating ones only)."""
    bad = []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad


@dataclass
class Stepper:
    """Runs training steps; owns the token source and (TBPTT) the carried state.

    ``source``: a ``SegmentStreamer`` (tbptt) or a ``TokenBatcher``; ``k``: segments per step."""

    model: nn.Module
    optimizer: Any            # optim.MixedOptimizer (any optimizer with grads() works)
    scheduler: Any
    scaler: Any               # lowprec.LossScaler
    source: Any
    tbptt: bool
    k: int = 1
    grad_clip: float | None = 1.0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    state: Any = None         # HybridState carried between TBPTT steps
    forward: Any = None       # what runs the training forward (a torch.compile-d model); None: model
    _last: tuple | None = None

    def _next_batches(self) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
        if self.tbptt:
            return [next(self.source) for _ in range(self.k)]
        x, y = next(self.source)
        return [(x, y, True)]

    def _forward(self, batches, state) -> tuple[torch.Tensor, Any, int]:
        """(mean loss over the scored targets, state, tokens read). Targets of -100 (cross-entropy's
        ignore_index: a retrieval task's non-answer tokens with train.task_loss=answer) are read
        but not scored."""
        total, scored, count = 0, 0, 0
        for x, y, reset in batches:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            fwd = self.model if self.forward is None else self.forward
            logits, state = fwd(x, None if reset else state)
            total = total + F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
            scored = scored + (y >= 0).sum()  # a tensor: no device sync
            count += y.numel()
        return total / scored.clamp(min=1), state, count

    def step(self) -> StepResult:
        t0 = time.perf_counter()
        self.model.train()
        batches = self._next_batches()
        state = None if self.state is None else self.state.detach()
        self._last = (batches, state)
        loss, new_state, count = self._forward(batches, state)
        scale = self.scaler.loss_scale
        self.scaler.scale(loss).backward()
        grads = list(self.optimizer.grads())
        self.scaler.unscale_(grads)
        norm = clip_grads_(grads, self.grad_clip)
        taken = self.scaler.step(self.optimizer, grads=grads)
        self.optimizer.zero_grad(set_to_none=True)
        if taken:
            self.scheduler.step()
        if self.tbptt:
            self.state = new_state.detach()
        return StepResult(float(loss.detach()), count, norm, taken, scale, time.perf_counter() - t0)

    def rerun_last(self) -> float:
        """Forward and backward of the last step's tokens again, with no update (for diagnosis:
        run it with telemetry enabled). Returns the loss."""
        if self._last is None:
            raise RuntimeError("no step has run yet")
        batches, state = self._last
        self.model.train()
        loss, _, _ = self._forward(batches, state)
        self.scaler.scale(loss).backward()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        return {"source": self.source.state_dict(),
                "hybrid_state": None if self.state is None else self.state.to("cpu").state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.source.load_state_dict(sd["source"])
        hs = sd.get("hybrid_state")
        self.state = None if hs is None else HybridState.from_state_dict(hs).to(self.device)


def _score(model: nn.Module, x, y, state, tokenizer, device):
    """(nats, tokens, chars, state) of one (B, T) batch."""
    logits, state = model(x.to(device), state)
    nats = float(F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum"))
    return nats, y.numel(), tokenizer.count_chars(y), state


def _totals(scores) -> dict[str, float]:
    nats = sum(s[0] for s in scores)
    tokens = sum(s[1] for s in scores)
    chars = sum(s[2] for s in scores)
    return {"loss": nats / tokens, "bpc": nats / (max(chars, 1) * math.log(2)), "tokens": tokens, "chars": chars}


@torch.no_grad()
def evaluate(model: nn.Module, windows: Iterable, tokenizer, device) -> dict[str, float]:
    """{"loss": nats/token, "bpc": bits/char, "tokens", "chars"} over ``windows`` ((x, y) batches)."""
    was_training = model.training
    model.eval()
    scores = [_score(model, x, y, None, tokenizer, device) for x, y in windows]
    model.train(was_training)
    return _totals(scores)


@torch.no_grad()
def evaluate_stream(model: nn.Module, streamer, n_segments: int, tokenizer, device) -> dict[str, float]:
    """As :func:`evaluate`, over the first ``n_segments`` segments (B, T) of a fresh
    ``SegmentStreamer`` of the validation split, read in order with the state carried: the way a
    TBPTT-trained model reads text (it has rarely seen a cold state, so fresh windows underrate it)."""
    was_training = model.training
    model.eval()
    scores, state = [], None
    for _ in range(n_segments):
        x, y, reset = next(streamer)
        score = _score(model, x, y, None if reset else state, tokenizer, device)
        state = score[3]
        scores.append(score)
    model.train(was_training)
    return _totals(scores)


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, n_tokens: int, *, window: int, temperature: float = 0.8,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample ``n_tokens`` after ``prompt`` (1-D int64 ids); returns the new ids (n_tokens,).

    As in training, self-attention sees the current segment (up to ``window`` tokens, positions
    from its start) and everything before it arrives through the carried state: the tokens of
    the open segment are re-run from the segment's initial state for every new token, and a full
    segment is committed (its state becomes the next segment's initial state).
    ``temperature`` 0 is greedy decoding."""
    if prompt.numel() == 0:
        raise ValueError("generate needs a prompt of at least one token")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    state, seg = None, prompt.to(device=device, dtype=torch.int64).reshape(1, -1)
    while seg.shape[1] > window:  # commit the prompt's full segments; 1..window tokens stay open
        _, state = model(seg[:, :window], state)
        seg = seg[:, window:]
    out = []
    for _ in range(n_tokens):
        logits, end_state = model(seg, state)
        last = logits[0, -1].float().cpu()
        if temperature <= 0:
            nxt = int(last.argmax())
        else:
            nxt = int(torch.multinomial(torch.softmax(last / temperature, dim=-1), 1, generator=generator))
        out.append(nxt)
        new = torch.tensor([[nxt]], dtype=torch.int64, device=device)
        if seg.shape[1] == window:
            state, seg = end_state, new
        else:
            seg = torch.cat([seg, new], dim=1)
    model.train(was_training)
    return torch.tensor(out, dtype=torch.int64)
