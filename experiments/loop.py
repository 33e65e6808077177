"""One training step, evaluation and sampling for a `HybridLM` (or any ``model(x, state)``).

A step (``Stepper.step``) reads its tokens from one of two sources:

- TBPTT (``tbptt=True``): a ``SegmentStreamer``'s B contiguous streams, ``k`` segments (B, T) per
  step, in order. The hybrid state is carried from segment to segment, cut from the graph
  (``state.detach()``) at the start of every step, and dropped where the streamer says
  ``reset`` (a new epoch). Gradients flow through at most ``k`` segments.
- windows (``tbptt=False``): a ``TokenBatcher``'s random windows (B, T), each from a fresh state.

Loss (nats/token) over the step's ``n = k·B·T`` targets, then the loss-scaled update
(``Stepper.train_step``)::

    loss  = (1/n) Σ CE(logits, y)
    (S·loss).backward()                   S: the LossScaler's scale (1 when scaling is off)
    g     ← g / S;  found_inf = any g is inf/NaN                      a flag on the device
    g     ← g · min(1, c / (‖g‖₂ + 1e-6))   clipping at c = grad_clip (‖g‖ over every gradient, native
                                            ones too; a non-finite ‖g‖ leaves g as it is)
    step, skipped where found_inf: weights, moments and step counters keep their bits
    S and its counters updated from found_inf; the schedule advances (skipped steps too)

Nothing in it waits for the device (given optimizer parts that take the flag on the device, as
``build_optimizer``'s are on CUDA: see ``docs/optim.md``): the loss, ‖g‖, the flag and S stay tensors
in the ``StepResult`` until the caller reads them (``read_results``, one copy for many steps), so the
host runs ahead and queues the next step while the device computes. The learning-rate schedule is a
function of the step number: a skipped update still advances it (as with ``torch.amp.GradScaler``),
which keeps that decision off the device too. The batches are copied to the device from pinned
memory, asynchronously.

``compile=True`` compiles the forward and the loss (and, through AOTAutograd, their backward): once,
for the fresh windows, or (TBPTT) for one segment from a carried state, called for each of the step's
segments (with several, the carried state made to require grad as the state one segment hands the next
does, so all meet one graph, one segment long); a TBPTT step that starts a document (the first, and one per
epoch) runs eager instead of compiling a second graph for the state-less shape class. The update
runs eager: Bop/TernaryBop/SRAdamW reseed a host generator per weight (a graph break) and torch's
fused AdamW is one kernel already. ``compile="blocks"``
compiles the model's blocks instead (``HybridLM.compile_blocks``: one compiled body for all of
them, everything else eager), in every step and in evaluation.

Evaluation scores validation windows, each from a fresh state (``evaluate``), or, for a model
trained with carried state, the validation split read as B contiguous streams with the state
carried (``evaluate_stream``); both report
``loss = Σ nats / Σ targets`` and ``bpc = Σ nats / (Σ chars · ln 2)`` where the characters under
the targets are counted exactly by the tokenizer.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hybrid import HybridState

__all__ = [
    "StepResult",
    "Stepper",
    "clip_grads_",
    "evaluate",
    "evaluate_stream",
    "generate",
    "nonfinite_tensors",
    "read_results",
]


@dataclass
class StepResult:
    """What one step did. The tensors are 0-d and on the device; reading one waits for the step."""

    loss: torch.Tensor         # mean nats/token (NaN/inf on a bad step)
    grad_norm: torch.Tensor    # ‖g‖₂ after unscaling, before clipping (inf/NaN on a bad step)
    found_inf: torch.Tensor    # 1.0: some gradient was inf/NaN and the update was skipped; else 0.0
    loss_scale: torch.Tensor   # the scale used for this step's backward
    tokens: int                # targets read


def read_results(results: list[StepResult], *extra: torch.Tensor) -> tuple[list[tuple[float, float, bool, float]],
                                                                            list[float]]:
    """``[(loss, grad_norm, taken, loss_scale)]`` of each step and the values of ``extra`` 0-d
    tensors, with one device-to-host copy."""
    parts = [t.detach().reshape(()) for r in results for t in (r.loss, r.grad_norm, r.found_inf, r.loss_scale)]
    parts += [t.reshape(()) for t in extra]
    values = torch.stack([t.to(parts[0].device, torch.float64) for t in parts]).tolist() if parts else []
    steps = [(v[0], v[1], v[2] == 0, v[3]) for v in (values[i:i + 4] for i in range(0, 4 * len(results), 4))]
    return steps, values[4 * len(results):]


@torch.no_grad()
def clip_grads_(grads: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """‖g‖₂ over ``grads`` (a 0-d float32 tensor, on their device); with ``max_norm``, every gradient
    multiplied by ``min(1, max_norm / (‖g‖₂ + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_`` does,
    except that a non-finite norm leaves them untouched (that step is skipped). No host sync."""
    if not grads:
        return torch.zeros(())
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)))
    if max_norm:
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, torch.where(torch.isfinite(norm), factor, 1.0))
    return norm


def nonfinite_tensors(model: nn.Module) -> list[str]:
    """Names of parameters and buffers holding NaN/inf (floating ones only; of a model spread over
    several ranks, this rank's shards)."""
    bad = []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        t = t.to_local() if hasattr(t, "to_local") else t
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad


@dataclass
class Stepper:
    """Runs training steps; owns the token source and (TBPTT) the carried state.

    ``source``: a ``SegmentStreamer`` (tbptt) or a ``TokenBatcher``; ``k``: segments per step;
    ``compile``: torch.compile the forward and loss (see the module doc); ``"blocks"``: the model's
    blocks instead, each (``HybridLM.compile_blocks``)."""

    model: nn.Module
    optimizer: Any            # optim.MixedOptimizer (step(found_inf=...) and grads())
    scheduler: Any
    scaler: Any               # lowprec.LossScaler
    source: Any
    tbptt: bool
    k: int = 1
    grad_clip: float | None = 1.0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    state: Any = None         # HybridState carried between TBPTT steps
    compile: bool | str = False
    parallel: Any = None      # experiments.parallel.Distributed of several ranks, or None (one process)
    _last: tuple | None = None
    _scale_layers: list | None = None  # the layers whose native scales are synced after each step

    def __post_init__(self):
        if self.compile == "blocks":  # regional: the model's blocks, each compiled, the rest eager
            if not hasattr(self.model, "compile_blocks"):
                raise ValueError(f"compile='blocks' needs a model with compile_blocks() (HybridLM); "
                                 f"{type(self.model).__name__} has none")
            self.model.compile_blocks()
            self._sums = self._segments_sums
        elif self.compile and self.tbptt:  # one segment compiled, called for each of the step's segments
            self._segment = torch.compile(self._segment_sums)
            self._sums = self._compiled_segments_sums
        else:
            self._sums = torch.compile(self._segments_sums) if self.compile else self._segments_sums
        if self.scaler is not None:
            self.scaler.to(self.device)

    def _next_batches(self) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
        if self.tbptt:
            return [next(self.source) for _ in range(self.k)]
        x, y = next(self.source)
        return [(x, y, True)]

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda" and t.device.type == "cpu":
            t = t.pin_memory()  # a copy from pageable memory would wait for the device
        return t.to(self.device, non_blocking=True)

    def _segments_sums(self, xs, ys, resets, state, segment=None) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(Σ nats over the scored targets, their count, state) of the step's segments, each through
        ``segment`` (default ``_segment_sums``): what ``train.compile`` compiles without TBPTT (forward
        and loss; AOTAutograd compiles their backward)."""
        segment = segment or self._segment_sums
        total, scored = 0, 0
        for x, y, reset in zip(xs, ys, resets):
            nats, n, state = segment(x, y, None if reset else state)
            total, scored = total + nats, scored + n
        return total, scored, state

    def _segment_sums(self, x, y, state) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(Σ nats over the scored targets, their count, state) of one segment: what ``train.compile``
        compiles with TBPTT."""
        logits, state = self.model(x, state)
        nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        return nats, (y >= 0).sum(), state

    def _compiled_segments_sums(self, xs, ys, resets, state) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """``_segments_sums`` of a step with a carried state and no reset, one compiled segment called
        for each: with more than one segment the carried state is made to require grad
        (``HybridState.requiring_grad``) as the state a segment hands the next does, so every segment
        meets the same graph, which is then one segment long, however many segments a step has (its
        gradient for the carried state is computed and dropped); with one, the state is left as it is."""
        if len(xs) > 1:
            state = state.requiring_grad()
        return self._segments_sums(xs, ys, resets, state, segment=self._segment)

    def _sums_for(self, resets: tuple[bool, ...], state):
        """The compiled sums (``_sums``), or (TBPTT) the eager ones for a step that starts a document
        somewhere (no carried state, or a reset among its segments): the compiled graph is then the
        carried-state one only, compiled once, and the rare fresh-state step (the first, and one
        per epoch) costs no second compilation."""
        if self.tbptt and (state is None or any(resets)):
            return self._segments_sums
        return self._sums

    def _forward(self, batches, state) -> tuple[torch.Tensor, Any, int]:
        """(mean loss over the scored targets, state, tokens read). Targets of -100 (cross-entropy's
        ignore_index: a retrieval task's non-answer tokens with train.task_loss=answer) are read
        but not scored."""
        xs = [self._to_device(x) for x, _, _ in batches]
        ys = [self._to_device(y) for _, y, _ in batches]
        resets = tuple(bool(r) for _, _, r in batches)
        total, scored, state = self._sums_for(resets, state)(xs, ys, resets, state)
        loss = total / scored.clamp(min=1)
        return loss, state, sum(y.numel() for y in ys)

    def train_step(self, batches, state) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
        """One update from ``batches`` (``[(x, y, reset)]``) and the carried ``state``, queued on the
        device without waiting for it: ``(loss, new state, found_inf, grad_norm)``, all tensors."""
        if self.parallel is not None:
            return self._train_step_ranks(batches, state)
        self.model.train()
        loss, new_state, _ = self._forward(batches, state)
        self.scaler.scale(loss).backward()
        grads = list(self.optimizer.grads())
        if not grads:  # a step that would "succeed" and train nothing
            raise RuntimeError("the backward pass left no gradient on any trained tensor: the loss does not "
                               "depend on the model's weights (with train.compile=true: the compiled graph lost them)")
        found_inf = self.scaler.unscale_and_check_(grads)
        grad_norm = clip_grads_(grads, self.grad_clip)
        self.optimizer.step(found_inf=found_inf)
        self.scaler.update_(found_inf)
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), new_state, found_inf, grad_norm

    def _train_step_ranks(self, batches, state) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
        """``train_step`` on one of several ranks, each holding its rows of the global batch and its
        shards of the model (``experiments.parallel``). The loss is the mean over the scored targets
        of the GLOBAL batch: the ranks' sums of nats and of scored targets are all-reduced over dp
        (asynchronously: the backward does not wait for it), each rank backpropagates
        ``dp · Σ_rank / n_read`` (``n_read``: the targets all dp ranks read, every rank reading as many
        rows, as ``RankBatches`` ensures), which FSDP2's gradient average over the dp ranks turns into
        the gradient of ``Σ / n_read``, and the gradients are then multiplied by ``n_read / n_global``
        (1 unless targets were ignored, as with train.task_loss=answer): the gradient of the 1-process
        loss. Every rank checks only its shards for inf/NaN; the verdicts and the squares of ``‖g‖``
        (over every rank's shards) are summed in one all-reduce (one decision everywhere); per-tensor
        scales of row-sharded native layers are made equal again after a step that was taken. No
        host sync."""
        import torch.distributed as dist

        from lowprec.distributed import scale_sync_layers, sync_native_scales
        from lowprec.fsdp import precompute_gather_amax

        from .parallel import clip_grads_over_ranks_, local_grads

        d = self.parallel
        self.model.train()
        xs = [self._to_device(x) for x, _, _ in batches]
        ys = [self._to_device(y) for _, y, _ in batches]
        resets = tuple(bool(r) for _, _, r in batches)
        total, scored, new_state = self._sums_for(resets, state)(xs, ys, resets, state)
        sums = torch.stack([total.detach().float(), scored.float()])
        # the global count is known only after this all-reduce; the backward does not wait for it:
        # it starts with n = the targets read by all ranks (host-known), and the gradients are
        # multiplied by n / n_global once the count has arrived (1 unless targets were ignored)
        pending = dist.all_reduce(sums, group=d.dp_group, async_op=True)
        n_read = sum(y.numel() for y in ys) * d.dp
        self.scaler.scale(total * d.dp / n_read).backward()
        pending.wait()  # the device stream waits for the collective, not the host
        n_global = sums[1].clamp(min=1)
        grads = list(self.optimizer.grads())
        found_inf = self.scaler.unscale_and_check_(local_grads(grads))
        found_inf, grad_norm = clip_grads_over_ranks_(grads, self.grad_clip, d, found_inf=found_inf,
                                                      factor=n_read / n_global)
        self.optimizer.step(found_inf=found_inf)
        if self._scale_layers is None:  # found once, on the sharded model (a walk over its modules)
            self._scale_layers = scale_sync_layers(self.model)
        sync_native_scales(self.model, found_inf, layers=self._scale_layers)
        precompute_gather_amax(self.model)  # the next step's FP8 all-gathers: one all-reduce of amaxes
        self.scaler.update_(found_inf)
        self.optimizer.zero_grad(set_to_none=True)
        return sums[0] / n_global, new_state, found_inf, grad_norm

    def step(self) -> StepResult:
        """One step (``train_step`` on the next batches), then the schedule; nothing is read."""
        batches = self._next_batches()
        state = None if self.state is None else self.state.detach()
        self._last = (batches, state)
        scale = self.scaler.current_scale()
        loss, new_state, found_inf, grad_norm = self.train_step(batches, state)
        self.scheduler.step()
        if self.tbptt:
            self.state = new_state.detach()
        tokens = sum(y.numel() for _, y, _ in batches)
        if self.parallel is not None:  # the global batch's: every dp rank reads as many rows
            tokens *= self.parallel.dp
        return StepResult(loss, grad_norm, found_inf, scale, tokens)

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


def _totals(scores, group=None, device=None) -> dict[str, float]:
    nats = sum(s[0] for s in scores)
    tokens = sum(s[1] for s in scores)
    chars = sum(s[2] for s in scores)
    if group is not None:  # every rank scored its rows: the sums of all of them
        import torch.distributed as dist

        sums = torch.tensor([nats, tokens, chars], dtype=torch.float64, device=device)
        dist.all_reduce(sums, group=group)
        nats, tokens, chars = sums[0].item(), int(sums[1].item()), int(sums[2].item())
    return {"loss": nats / tokens, "bpc": nats / (max(chars, 1) * math.log(2)), "tokens": tokens, "chars": chars}


def _rows_of_rank(x: torch.Tensor, y: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """This rank's rows of a batch (``tensor_split``: a short last batch gives some ranks fewer).
    A rank left without rows runs the batch's first row and scores nothing (``False``): a sharded
    model's forward is a collective that every rank must take part in."""
    import torch.distributed as dist

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    xs, ys = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
    return (xs, ys, True) if len(xs) else (x[:1], y[:1], False)


@torch.no_grad()
def evaluate(model: nn.Module, windows: Iterable, tokenizer, device, group=None) -> dict[str, float]:
    """{"loss": nats/token, "bpc": bits/char, "tokens", "chars"} over ``windows`` ((x, y) batches).
    ``group``: the data-parallel process group of a model spread over several ranks; each rank
    scores its rows of every batch and the sums are all-reduced over it."""
    was_training = model.training
    model.eval()
    if group is None:
        scores = [_score(model, x, y, None, tokenizer, device) for x, y in windows]
    else:
        scores = []
        for x, y in windows:
            x, y, mine = _rows_of_rank(x, y, group)
            score = _score(model, x, y, None, tokenizer, device)
            if mine:
                scores.append(score)
    model.train(was_training)
    return _totals(scores, group, device)


@torch.no_grad()
def evaluate_stream(model: nn.Module, streamer, n_segments: int, tokenizer, device, group=None) -> dict[str, float]:
    """As :func:`evaluate`, over the first ``n_segments`` segments (B, T) of a fresh
    ``SegmentStreamer`` of the validation split, read in order with the state carried: the way a
    TBPTT-trained model reads text (it has rarely seen a cold state, so fresh windows underrate it).
    ``group``: as for :func:`evaluate`, with ``streamer`` serving this rank's rows
    (``experiments.rank_data.RankBatches``)."""
    was_training = model.training
    model.eval()
    scores, state = [], None
    for _ in range(n_segments):
        x, y, reset = next(streamer)
        score = _score(model, x, y, None if reset else state, tokenizer, device)
        state = score[3]
        scores.append(score)
    model.train(was_training)
    return _totals(scores, group, device)


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
