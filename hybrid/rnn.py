"""The RNN memory: a stack of LSTM layers written out by hand, and the chunk compressor.

Why by hand: `torch.nn.LSTM` (cuDNN) cannot be built at hidden size 16384 (its flat weight
storage overflows), and its weights are not `nn.Linear`s, so a precision policy could not reach
them. Here each layer is two plain `nn.Linear`s that `lowprec.apply_policy` can swap:

    rnn.lstm.N.ih   d -> 4d, with bias      input projection, ONE call over all T steps
    rnn.lstm.N.hh   d -> 4d, no bias        recurrent projection, one GEMM per step (the sequential part)
    rnn.lstm.N.norm LayerNorm(d)

One layer, input x (B, T, d), carried (h_0, c_0) (B, d):

    G = ih(norm(x))                                (B, T, 4d)
    for t = 1..T:
        [i, f, g, o] = G_t + hh(h_{t-1})           gate order i, f, g, o (as torch.nn.LSTM)
        c_t = σ(f) ⊙ c_{t-1} + σ(i) ⊙ tanh(g)
        h_t = σ(o) ⊙ tanh(c_t)
    y = h_1..T                                     (B, T, d)

Where the layer norm sits: on each layer's INPUT sequence (pre-norm), outside the recurrence.
So `rnn.lstm.0.norm` normalizes the token embeddings (N(0, 0.02)-scale, which would otherwise
give the gates almost no input signal), and `rnn.lstm.N.norm` for N >= 1 sits between layer N-1
and layer N. The top layer's raw output h ∈ (-1, 1) feeds the compressor. The norm costs nothing
sequential.

Precision: the gates, h and c are computed and carried in fp32 (`torch.promote_types(act, fp32)`,
so an fp64 model stays fp64); `hh` is called with h cast to the activation dtype, which is what
a policy's input quantizer would see anyway. No format is chosen here.

Backward: T dgrad GEMMs through `hh` are sequential, but its weight gradient Σ_t dG_tᵀ h_{t-1} is
not. The recurrence runs as one autograd node, `LSTMRecurrence`: per step `hh`'s GEMM forward and
its dgrad backward, then the weight gradient as ONE GEMM over the stacked steps
((4d, T·B) @ (T·B, d)) instead of T rank-B GEMMs, each written out in full and added. A plain
`nn.Linear` `hh` enters it directly, a policy's layer (`QLinear`) through
`QLinear.recurrent_gemms()`: every step's fprop and dgrad quantize their operands with that step's
own scales exactly as calling the layer does (bit-identical outputs and input gradients), and the
weight gradient applies the policy's wgrad formats to the stacked steps, so a per-tensor scale
(FP8 `granularity: tensor`) is one scale over all T steps instead of one per step
(`lowprec.gemm.RecurrentGemms` says what differs). An `hh` with forward hooks (tensor
parallelism's) or a bias, and any `hh` under autocast, is called once per step instead, and
autograd adds the T weight gradients.

Execution on CUDA: each loop (forward, backward) is replayed as one CUDA graph from its second call
on (`LSTMLayer.graphs_for`, `lowprec.cuda_graphs.GraphCache`), instead of launching every step's
kernels from Python; each step's cell runs compiled, and also computes the next GEMM's operand from
its output (`RecurrentGemms.input_cast` / `grad_cast`: a cast, or for a scaled format such as FP8 with
a per-tensor scale its amax and scaled cast; for a plain `hh`, h_t and da_t in the activation dtype),
so a step is its GEMM and its cell's kernels, forward and backward, instead of some thirty small
kernels of quantization around each GEMM.

The compressor maps a chunk summary s (B, K, d) to one memory vector per chunk:

    m = fc2(GELU(fc1(s)))        rnn.compressor.fc1: d -> d/2, rnn.compressor.fc2: d/2 -> d (with biases)

Two modes produce the memory vectors (`RNNMemory.stream` / `RNNMemory.chunked`):

- `stream` (the paper as written): the stack runs over every token, state carried across chunks
  and segments; chunk j's summary is the top layer's output at the chunk's last token.
- `chunked`: every chunk is encoded by the SAME stack from a zero state, all chunks of the
  segment batched together (C sequential steps instead of T); its summary is the top output at
  its last token (`pool="last"`) or the mean of the top outputs over its C tokens (`pool="mean"`:
  every token reaches the summary directly, so what the chunk said early is not left to survive
  C forget gates; same parameters). The SAME stack (same weights) then recurs over the chunk summaries with the
  state carried across chunks and segments (T/C steps). Sequential steps per segment: C + T/C
  instead of T (64 + 2048 vs 131072 for the paper's largest window). Same parameters as `stream`.
"""
from __future__ import annotations

import functools
import itertools
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowprec.common import eager_division
from lowprec.cuda_graphs import GraphCache
from lowprec.gemm import loop_scope

from .config import CHUNK_POOLS


def _same(t: Tensor) -> Tensor:
    return t


class LinearGemms:
    """A plain `nn.Linear` `hh` (no bias) in the protocol of `lowprec.gemm.RecurrentGemms`, which
    `LSTMRecurrence` calls: weights = (W,), `fprop(x, weights, a) -> (x Wᵀ, saved)`,
    `dgrad(dy, weights, saved, need_dx, g) -> dy W`, `wgrad(dy, x, weights, operands) -> (dyᵀ x,)`,
    `fprop_saved(weights, rows, device)` (a step's `saved`, derived again), `end_forward()` (after
    the forward loop), `steps_operands(ad)` (which of wgrad's operands the loops keep from the steps),
    `grad_slots`, `stateless`, `recording`, `input_cast`, `grad_cast`, `operand_is_input`."""

    @staticmethod
    def fprop(x, weights, a=None):
        return F.linear(x if a is None else a, weights[0]), ()

    @staticmethod
    def dgrad(dy, weights, saved, need_dx=True, g=None):
        return (dy if g is None else g) @ weights[0] if need_dx else None

    @staticmethod
    def wgrad(dy, x, weights, operands=(False, False)):
        return (dy.t() @ x,)

    @staticmethod
    def steps_operands(ad):
        return False, False  # dy and x are the operands as they are: nothing a step made to keep

    grad_slots = (0,)  # the weights wgrad returns a gradient for
    stateless = True  # no state that a step updates (the compiled operators need that)
    recording = False  # no telemetry recorded at each step (CUDA graphs would not replay it)
    # The GEMMs take x and dy as they are, in the activation dtype: a cell computes that cast in
    # its own kernel, and the loops use it as the step's input and gradient (operand_is_input).
    input_cast = grad_cast = staticmethod(_same)
    operand_is_input = True  # input_cast(x) IS x in the activation dtype (a quantized layer's is not)

    @staticmethod
    def fprop_saved(weights, rows, device):
        return ()

    @staticmethod
    def end_forward():
        pass


LINEAR_GEMMS = LinearGemms()


def _cell(gx_t, hh_t, h, c, valid_t, ad=None, cast=None):
    """One step's gates -> (h_t, c_t, the activated gates (4, B, d), tanh(c_t), the next step's
    GEMM input operand `cast(h_t in ad)` or None without ``cast``); a step with valid_t False holds
    (h, c)."""
    gates = gx_t + hh_t.to(h.dtype)
    i, f, g, o = gates.chunk(4, dim=-1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_t = f * c + i * g
    tanh_c = torch.tanh(c_t)
    h_t = o * tanh_c
    acts = torch.stack([i, f, g, o])  # each (B, d) contiguous, as autograd saves them
    if valid_t is not None:
        h_t, c_t = torch.where(valid_t, h_t, h), torch.where(valid_t, c_t, c)
    return h_t, c_t, acts, tanh_c, None if cast is None else cast(h_t.to(ad))


def _cell_backward(dh, dc, dy_t, acts_t, tanh_c, c_prev, valid_t, ad=None, cast=None):
    """One step of the backward, from the last -> (da_t, dc_{t-1} before a held step's part, what
    a held step passes on: dh, dc or None, and dgrad's operand `cast(da_t in ad)` or None without
    ``cast``). The caller adds dgrad(da_t) to get dh_{t-1}."""
    sigmoid_bwd, tanh_bwd = torch.ops.aten.sigmoid_backward, torch.ops.aten.tanh_backward
    dh = dh + dy_t
    i, f, g, o = acts_t.unbind(0)
    dh_held = dc_held = None
    if valid_t is not None:  # a held step passes dh, dc on to step t - 1 unchanged
        dh_held, dc_held = torch.where(valid_t, 0.0, dh), torch.where(valid_t, 0.0, dc)
        dh, dc = torch.where(valid_t, dh, 0.0), torch.where(valid_t, dc, 0.0)
    dc = dc + tanh_bwd(dh * o, tanh_c)
    da = torch.cat([sigmoid_bwd(dc * g, i), sigmoid_bwd(dc * c_prev, f),
                    tanh_bwd(dc * i, g), sigmoid_bwd(dh * tanh_c, o)], dim=-1)
    return da, dc * f, dh_held, dc_held, None if cast is None else cast(da.to(ad))


_FUSED: list = []

# Compiled variants one process's cells may need: activation and state dtypes, with and without a
# mask, the next GEMM's operand function or none, a second batch size (chunked mode), and inputs whose
# dispatch keys differ (made inside a custom operator, a CUDA graph's buffers, FSDP2's gathered
# weights). torch's default limit (8) is exceeded by a sharded bf16 run.
CELL_VARIANTS = 64


def _compiled_cell(f):
    """``f`` compiled (fullgraph, with eager's fp32 division); a call that needs one more variant
    than torch's recompile limit allows is compiled again under ``CELL_VARIANTS`` (the limit is only
    raised for that call: a ``config.patch`` around every call would cost ~0.1 ms of host time each)."""
    compiled = torch.compile(f, fullgraph=True, options=eager_division())
    over_limit = (torch._dynamo.exc.FailOnRecompileLimitHit, torch._dynamo.exc.Unsupported)

    @functools.wraps(f)
    def call(*args, **kwargs):
        # Always without grad, below autograd and ADInplaceOrView (the cell runs inside the
        # recurrence's operators, which need none of them): the compiled function's guards see the
        # same grad mode and dispatch keys however the operator was reached. Otherwise a call from
        # another context (a CUDA-graph tree records its operators differently than it warms them
        # up) would compile the cell again, and a compilation inside a CUDA graph capture (its
        # autotuning synchronizes) breaks the capture.
        with torch.no_grad(), torch._C._AutoDispatchBelowADInplaceOrView():
            try:
                return compiled(*args, **kwargs)
            except over_limit:  # raised before the function ran: nothing to undo
                if torch._dynamo.config.recompile_limit >= CELL_VARIANTS:
                    raise
                with torch._dynamo.config.patch(recompile_limit=CELL_VARIANTS):
                    return compiled(*args, **kwargs)
    return call


def _cells(fused: bool):
    """(cell, cell_backward): the eager functions, op for op as autograd differentiates the
    per-step loop; ``fused`` (the compiled recurrence operators on CUDA): the same functions
    compiled (each step's pointwise work in one kernel instead of ~15, the next GEMM's operand
    included where the GEMMs offer it as `input_cast` / `grad_cast`; the numbers then differ from
    eager by the fused kernels' rounding)."""
    if fused:
        if not _FUSED:
            _FUSED.extend(_compiled_cell(f) for f in (_cell, _cell_backward))
        return _FUSED
    return _cell, _cell_backward


def _recurrence_forward(gx, h, c, valid, ad, gemms, weights, fused: bool = False):
    """The forward loop of `LSTMRecurrence` -> (y, h_T, c_T, hs_prev, cs_prev, acts, tanh_cs, saved):
    y (B, T, d) = h_1..T, the state after the last step, what the backward needs stacked over the
    steps (h_{t-1} in ad, or its fprop operand where wgrad takes that: `steps_operands`; c_{t-1}, the
    activated gates (T, 4, B, d), tanh(c_t)), and each step's
    `saved` from `gemms.fprop`, concatenated. ``fused``: as `_cells`."""
    cell = _cells(fused)[0]
    cast = gemms.input_cast  # each step's GEMM input operand, computed by the step before (its cell)
    a = None if cast is None else cast(h.to(ad))
    same = gemms.operand_is_input and a is not None  # the operand is h in ad itself
    keep_operand = gemms.steps_operands(ad)[1]  # what is kept of h_{t-1}: its operand, which wgrad takes
    hs_prev, cs_prev, acts, tanh_cs, ys, saved = [], [], [], [], [], []
    for t, gx_t in enumerate(gx.unbind(1)):
        h_in = a if same else h.to(ad)
        hh_t, saved_t = gemms.fprop(h_in, weights, a)
        hs_prev.append(a[0] if keep_operand else h_in)
        cs_prev.append(c)
        h, c, acts_t, tanh_c, a = cell(gx_t, hh_t, h, c, None if valid is None else valid[t], ad, cast)
        acts.append(acts_t)
        tanh_cs.append(tanh_c)
        saved.extend(saved_t)
        ys.append(h)
    gemms.end_forward()
    return (torch.stack(ys, dim=1), h, c, torch.stack(hs_prev), torch.stack(cs_prev), torch.stack(acts),
            torch.stack(tanh_cs), saved)


def _recurrence_backward(dy, dh, dc, valid, hs_prev, cs_prev, acts, tanh_cs, gemms, weights, saved,
                         need_state: bool, need_w: bool, fused: bool = False):
    """The backward of `LSTMRecurrence` -> (dgx (B, T, 4d), dh_0, dc_0, weight gradients or Nones);
    ``saved``: the per-step `saved` of the forward, ``n_saved`` tensors a step. Without
    ``need_state`` the last dgrad is skipped (dh_0 and dc_0 are then not the gradients)."""
    T = hs_prev.shape[0]
    n_saved = len(saved) // T
    (B, d), ad = cs_prev.shape[1:], hs_prev.dtype
    cell_backward = _cells(fused)[1]
    cast = gemms.grad_cast  # dgrad's operand of da_t, computed by the cell
    same = gemms.operand_is_input and cast is not None  # that operand is da_t in ad itself
    sd = dh.dtype
    das = [None] * T
    take_grads, take_inputs = gemms.steps_operands(ad)
    gs = [None] * T if need_w and take_grads else None  # the steps' dgrad operands, which wgrad takes stacked
    for t in range(T - 1, -1, -1):
        # dh enters each step in ad, as dgrad returned it: the cell's first op, dh + dy_t, adds it in
        # the state dtype (an exact widening, the same sum as casting it first)
        das[t], dc, dh_held, dc_held, g = cell_backward(dh, dc, dy[:, t], acts[t], tanh_cs[t], cs_prev[t],
                                                        None if valid is None else valid[t], ad, cast)
        if gs is not None:
            gs[t] = g[0]
        saved_t = saved[t * n_saved:(t + 1) * n_saved]
        if t == 0 and not need_state:
            if need_w:  # h_0, c_0 need no gradient: no last dgrad (the step's record still made)
                gemms.dgrad(g if same else das[t].to(ad), weights, saved_t, need_dx=False)
            break
        dh = gemms.dgrad(g if same else das[t].to(ad), weights, saved_t, g=g)
        if valid is not None:
            dh, dc = dh + dh_held, dc + dc_held
    da = torch.stack(das, dim=1)  # (B, T, 4d)
    dws = (None,) * len(weights)
    if need_w:  # one GEMM over all T·B rows
        g = torch.stack(gs).reshape(T * B, -1) if gs is not None else da.transpose(0, 1).reshape(T * B, -1).to(ad)
        dws = gemms.wgrad(g, hs_prev.reshape(T * B, d), weights, (gs is not None, take_inputs))
    return da, dh.to(sd), dc, dws


def _plan_of(gemms):
    return getattr(gemms, "plan", None)  # what the GEMMs compute (a frozen, hashable GemmPlan), or None


def _run_forward(gx, h, c, valid, ad, gemms, weights, graphs, fused: bool):
    """`_recurrence_forward`, replayed as a CUDA graph when ``graphs`` (a `GraphCache`) is given;
    the per-step ``saved`` is then None (the backward derives it again, `fprop_saved`)."""
    if graphs is None:  # (inside a compiled step's capture: the loop's steps share its weight operands)
        with loop_scope(gx):
            return _recurrence_forward(gx, h, c, valid, ad, gemms, weights, fused)

    def loop(gx, h, c, valid, *weights):
        return _recurrence_forward(gx, h, c, valid, ad, gemms, weights, fused)[:7]
    return *graphs(loop, (gx, h, c, valid), weights, ("forward", ad, fused, _plan_of(gemms))), None


def _run_backward(dy, dh, dc, valid, hs_prev, cs_prev, acts, tanh_cs, gemms, weights, saved, need_state, need_w,
                  graphs, fused: bool):
    """`_recurrence_backward`, replayed as a CUDA graph when ``graphs`` is given; ``saved`` None:
    derived again from the weights (only for `stateless` GEMMs)."""
    def loop(dy, dh, dc, valid, hs_prev, cs_prev, acts, tanh_cs, *weights):
        steps = saved  # None after a graphed forward: a graph derives them itself (each replay reads the weight)
        if steps is None:
            steps = list(gemms.fprop_saved(weights, hs_prev.shape[1], hs_prev.device)) * hs_prev.shape[0]
        return _recurrence_backward(dy, dh, dc, valid, hs_prev, cs_prev, acts, tanh_cs, gemms, weights, steps,
                                    need_state, need_w, fused)
    copied = (dy, dh, dc, valid, hs_prev, cs_prev, acts, tanh_cs)
    if graphs is None:
        with loop_scope(dy):
            return loop(*copied, *weights)
    return graphs(loop, copied, weights, ("backward", need_state, need_w, fused, _plan_of(gemms)))


class LSTMRecurrence(torch.autograd.Function):
    """The recurrence of one layer, as one autograd node; `hh` (W (4d, d)) enters through `gemms`
    (`LINEAR_GEMMS` for a plain `nn.Linear`, `QLinear.recurrent_gemms()` for a policy's layer)
    and the tensors `weights` that go with it.

    Forward: the loop of the module doc, op for op, `hh(h_{t-1})` = `gemms.fprop` (so the same
    numbers as calling `hh` per step). Backward, per step t from the last (the sequential part;
    a = gate pre-activations, ad = the activation dtype h_{t-1} enters `hh` in, everything else in
    the state dtype):

        dh_t += dy_t                                        (y_t = h_t)
        do = dh_t ⊙ tanh(c_t)          dc_t += dh_t ⊙ o ⊙ (1 - tanh²(c_t))
        di = dc_t ⊙ g     df = dc_t ⊙ c_{t-1}     dg = dc_t ⊙ i     dc_{t-1} = dc_t ⊙ f
        da_t = [di ⊙ i(1-i), df ⊙ f(1-f), dg ⊙ (1-g²), do ⊙ o(1-o)]
        dh_{t-1} = dgrad(da_t)  (= da_t W, in ad)

    each product computed by the kernels, in the order, that autograd uses for the per-step ops
    (`tanh_backward`, `sigmoid_backward`), so dgx, dh_0 and dc_0 are bit-identical to differentiating
    the per-step loop. Then the weight gradient of all steps as ONE GEMM over the stacked steps,
    dW = Σ_t da_tᵀ h_{t-1} = wgrad([da_1; ...; da_T], [h_0; ...; h_{T-1}])  ((4d, T·B) @ (T·B, d)),
    instead of T rank-B products each written out and added into a (4d, d) buffer; it differs from
    the per-step sum by the order of the sum (and, for a quantized `hh`, as `RecurrentGemms` says).
    A step with valid[t] False holds the state (h_t = h_{t-1}, c_t = c_{t-1}): its da_t is 0 and
    the gradients pass it unchanged.

    Under `torch.compile` the same two loops run as the operators `hybrid::lstm_recurrence` and
    `hybrid::lstm_recurrence_backward` (`LSTMLayer.forward` picks them): opaque to the compiler,
    so a layer adds two nodes to the graph instead of T unrolled steps forward and backward.
    """

    @staticmethod
    def forward(ctx, gx, h, c, valid, ad, gemms, graphs, *weights):
        """gx (B, T >= 1, 4d) input projections and h, c (B, d) in the state dtype; valid (T,) bool
        or None; ad the activation dtype; gemms and weights as above; graphs: the layer's
        `GraphCache` or None (`LSTMLayer.graphs`) -> y (B, T, d) = h_1..T, h_T, c_T (state dtype)."""
        y, h, c, hs_prev, cs_prev, acts, tanh_cs, saved = _run_forward(gx, h, c, valid, ad, gemms, weights, graphs,
                                                                       fused=False)
        ctx.gemms, ctx.graphs, ctx.n_weights, ctx.derive = gemms, graphs, len(weights), saved is None
        ctx.save_for_backward(valid, hs_prev, cs_prev, acts, tanh_cs, *weights, *(saved or ()))
        return y, h, c

    @staticmethod
    def backward(ctx, dy, dh, dc):
        valid, hs_prev, cs_prev, acts, tanh_cs, *rest = ctx.saved_tensors
        weights, saved = rest[:ctx.n_weights], rest[ctx.n_weights:]
        da, dh, dc, dws = _run_backward(
            dy, dh, dc, valid, hs_prev, cs_prev, acts, tanh_cs, ctx.gemms, weights, None if ctx.derive else saved,
            need_state=ctx.needs_input_grad[1] or ctx.needs_input_grad[2], need_w=any(ctx.needs_input_grad[7:]),
            graphs=ctx.graphs, fused=False)
        return (da, *(g if need else None for g, need in zip((dh, dc), ctx.needs_input_grad[1:3])),
                None, None, None, None, *dws)


# ---- the recurrence as two operators, for torch.compile -------------------------------------------
# A compiled graph cannot carry `gemms` (a Python object) into an operator; it carries the layer's
# key, and the operator asks the layer for its GEMMs when it runs. Keys are given out per LSTMLayer
# (a copy gets its own) and dropped with the layer.
_LAYERS: weakref.WeakValueDictionary[str, LSTMLayer] = weakref.WeakValueDictionary()
_KEYS = itertools.count(1)


def _layer_of(key: str) -> LSTMLayer:
    layer = _LAYERS.get(key)
    if layer is None:
        raise RuntimeError(f"hybrid::lstm_recurrence: the LSTM layer of key {key} no longer exists")
    return layer


def _gemms_of(key: str):
    hh = _layer_of(key).hh
    return LINEAR_GEMMS if type(hh) is nn.Linear else hh.recurrent_gemms(weights=False)[0]


def _full(weights: list[Tensor], slots: list[int], n: int) -> tuple:
    """The gemms' weight tuple of ``n`` entries from its present tensors at ``slots``."""
    full = [None] * n
    for i, w in zip(slots, weights):
        full[i] = w
    return tuple(full)


@torch.library.custom_op("hybrid::lstm_recurrence", mutates_args=())
def _recurrence_op(gx: Tensor, h: Tensor, c: Tensor, valid: Tensor | None, weights: list[Tensor],
                   slots: list[int], n_weights: int, key: str, ad: torch.dtype
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    gemms = _gemms_of(key)
    return _run_forward(gx, h, c, valid, ad, gemms, _full(weights, slots, n_weights),
                        _layer_of(key).graphs_for(gx, gemms), fused=gx.is_cuda)[:7]


@_recurrence_op.register_fake
def _(gx, h, c, valid, weights, slots, n_weights, key, ad):
    (B, T, _), d = gx.shape, h.shape[-1]
    return (h.new_empty(B, T, d), h.new_empty(B, d), h.new_empty(B, d), h.new_empty(T, B, d, dtype=ad),
            h.new_empty(T, B, d), h.new_empty(T, 4, B, d), h.new_empty(T, B, d))


@torch.library.custom_op("hybrid::lstm_recurrence_backward", mutates_args=())
def _recurrence_backward_op(dy: Tensor, dh: Tensor, dc: Tensor, valid: Tensor | None, hs_prev: Tensor,
                            cs_prev: Tensor, acts: Tensor, tanh_cs: Tensor, weights: list[Tensor],
                            slots: list[int], n_weights: int, key: str, need_state: bool, need_w: bool
                            ) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    gemms = _gemms_of(key)
    da, dh, dc, dws = _run_backward(dy, dh, dc, valid, hs_prev, cs_prev, acts, tanh_cs, gemms,
                                    _full(weights, slots, n_weights), None, need_state, need_w,
                                    _layer_of(key).graphs_for(dy, gemms), fused=dy.is_cuda)
    return da, dh, dc, [dws[i] for i in gemms.grad_slots] if need_w else []


@_recurrence_backward_op.register_fake
def _(dy, dh, dc, valid, hs_prev, cs_prev, acts, tanh_cs, weights, slots, n_weights, key, need_state, need_w):
    full = _full(weights, slots, n_weights)
    dws = [full[i].new_empty(full[i].shape) for i in _gemms_of(key).grad_slots] if need_w else []
    T, B, d = cs_prev.shape
    return cs_prev.new_empty(B, T, 4 * d), cs_prev.new_empty(B, d), cs_prev.new_empty(B, d), dws


def _setup_recurrence(ctx, inputs, output):
    _, _, _, valid, weights, slots, n_weights, key, _ = inputs
    _, _, _, hs_prev, cs_prev, acts, tanh_cs = output
    ctx.meta = (slots, n_weights, key)
    ctx.save_for_backward(valid, hs_prev, cs_prev, acts, tanh_cs, *weights)


def _recurrence_op_backward(ctx, dy, dh, dc, *_):
    slots, n_weights, key = ctx.meta
    valid, hs_prev, cs_prev, acts, tanh_cs, *weights = ctx.saved_tensors
    needs = ctx.needs_input_grad
    need_w = any(needs[4]) if isinstance(needs[4], (list, tuple)) else bool(needs[4])
    da, dh0, dc0, dws = _recurrence_backward_op(dy, dh, dc, valid, hs_prev, cs_prev, acts, tanh_cs, weights, slots,
                                                n_weights, key, needs[1] or needs[2], need_w)
    grads = dict(zip(_gemms_of(key).grad_slots, dws))
    dweights = [grads.get(i) for i in slots]
    return da, dh0 if needs[1] else None, dc0 if needs[2] else None, None, dweights, None, None, None, None


_recurrence_op.register_autograd(_recurrence_op_backward, setup_context=_setup_recurrence)


def _compiled_recurrence(layer: LSTMLayer, gx, h, c, valid, ad, weights) -> tuple[Tensor, Tensor, Tensor]:
    slots = [i for i, w in enumerate(weights) if w is not None]
    y, h, c, *_ = _recurrence_op(gx, h, c, valid, [weights[i] for i in slots], slots, len(weights), layer._key, ad)
    return y, h, c


# Widest layer whose step loops are replayed as CUDA graphs. A step's recurrent GEMM reads the
# (4d, d) weight: beyond d = 4096 (67M elements) that takes longer than the host needs to launch
# the step's kernels, so a graph saves little, while its buffers and the weight operand it derives
# would cost memory (gigabytes at d = 16384).
GRAPH_MAX_WIDTH = 4096


class LSTMLayer(nn.Module):
    """One LSTM layer (`ih`, `hh`) with a LayerNorm on its input sequence (`norm`)."""

    def __init__(self, d: int, eps: float = 1e-5, cuda_graphs: bool = True):
        super().__init__()
        self.ih = nn.Linear(d, 4 * d, bias=True)
        self.hh = nn.Linear(d, 4 * d, bias=False)
        self.norm = nn.LayerNorm(d, eps=eps)
        self.cuda_graphs = cuda_graphs
        self._register()

    def _register(self) -> None:
        """A key of its own for the compiled recurrence's operators (see `_gemms_of`), and CUDA
        graphs of its own."""
        self._key = f"lstm{next(_KEYS)}"  # a string: a compiled graph keeps it constant (an int may become symbolic)
        _LAYERS[self._key] = self
        self.graphs = GraphCache()

    def graphs_for(self, gx: Tensor, gemms) -> GraphCache | None:
        """The cache that replays this layer's recurrence loops as CUDA graphs, or None where they
        run step by step: ``cuda_graphs`` off, not on CUDA, wider than `GRAPH_MAX_WIDTH`, GEMMs that
        update a delayed-scaling history or record telemetry at every step, inside a compiler's
        trace or another capture."""
        if not (self.cuda_graphs and gx.is_cuda and gemms.stateless) or torch.compiler.is_compiling():
            return None
        if self.hh.in_features > GRAPH_MAX_WIDTH:
            return None
        if gemms.recording or torch.cuda.is_current_stream_capturing():
            return None
        return self.graphs

    def __setstate__(self, state):
        super().__setstate__(state)  # a copy (copy.deepcopy, pickle) must not answer to the original's key
        self._register()

    def _recurrent_gemms(self, x: Tensor):
        """(gemms, weights) for `LSTMRecurrence`, or None where `hh` must be called per step."""
        hh = self.hh
        # hooks on hh (e.g. tensor parallelism's) would not run; autocast's casts the per-step path
        # leaves to autograd; no steps: the per-step path returns the empty sequence
        hooks = (hh._forward_hooks, hh._forward_pre_hooks, hh._backward_hooks, hh._backward_pre_hooks)
        if (getattr(hh, "bias", None) is not None or any(hooks) or torch.is_autocast_enabled(x.device.type)
                or x.shape[1] == 0):
            return None
        # exactly an nn.Linear (not a subclass with its own forward), in the activation dtype
        if type(hh) is nn.Linear:
            return (LINEAR_GEMMS, (hh.weight,)) if hh.weight.dtype == x.dtype else None
        recurrent_gemms = getattr(hh, "recurrent_gemms", None)  # a policy's layer (lowprec.nn.QLinear)
        return recurrent_gemms() if recurrent_gemms is not None else None

    def forward(self, x: Tensor, h: Tensor, c: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, d) activations; h, c (B, d) in the state dtype -> (h_1..T (B, T, d), h_T, c_T).

        valid: None, or (T,) bool: at a step t with valid[t] False the state is held (h_t = h_{t-1},
        c_t = c_{t-1}), so steps past the end of a shorter sequence change nothing.

        A plain `nn.Linear` `hh` or a policy's layer that offers `recurrent_gemms` runs as
        `LSTMRecurrence` (its weight gradient in one GEMM; under `torch.compile`, as its two
        operators, unless the layer keeps a delayed-scaling history); any other `hh`, one with a bias or
        forward hooks, and any `hh` under autocast are called once per step, and autograd sums the
        T weight gradients. T may be 0 (an empty output, the state unchanged).
        """
        sd = h.dtype
        gx = self.ih(self.norm(x)).to(sd)  # all T input projections in one GEMM
        recurrent = self._recurrent_gemms(x)
        if recurrent is not None:
            gemms, weights = recurrent
            if torch.compiler.is_compiling() and gemms.stateless:
                y, h, c = _compiled_recurrence(self, gx, h, c, valid, x.dtype, weights)
            else:
                y, h, c = LSTMRecurrence.apply(gx, h, c, valid, x.dtype, gemms, self.graphs_for(gx, gemms), *weights)
            return y.to(x.dtype), h, c
        outs = []
        for t, gx_t in enumerate(gx.unbind(1)):  # unbind: one backward node (a select per step would zero-fill (B, T, 4d) each)
            gates = gx_t + self.hh(h.to(x.dtype)).to(sd)
            i, f, g, o = gates.chunk(4, dim=-1)
            c_t = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_t = torch.sigmoid(o) * torch.tanh(c_t)
            if valid is None:
                h, c = h_t, c_t
            else:
                h, c = torch.where(valid[t], h_t, h), torch.where(valid[t], c_t, c)
            outs.append(h)
        y = torch.stack(outs, dim=1) if outs else h.new_zeros(x.shape[0], 0, h.shape[-1])
        return y.to(x.dtype), h, c


class Compressor(nn.Module):
    """m = fc2(GELU(fc1(s))): d -> hidden -> d, applied to each chunk summary."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, s: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(s)))


class RNNMemory(nn.Module):
    """`lstm` (ModuleList of `LSTMLayer`) + `compressor`; turns token embeddings into chunk vectors."""

    def __init__(self, d: int, n_layers: int, chunk: int, hidden: int, eps: float = 1e-5, pool: str = "last",
                 cuda_graphs: bool = True):
        super().__init__()
        if pool not in CHUNK_POOLS:
            raise ValueError(f"unknown chunk pool {pool!r}; choose one of {', '.join(CHUNK_POOLS)}")
        self.chunk, self.pool = chunk, pool
        self.lstm = nn.ModuleList(LSTMLayer(d, eps, cuda_graphs) for _ in range(n_layers))
        self.compressor = Compressor(d, hidden)

    @staticmethod
    def state_dtype(act: torch.dtype) -> torch.dtype:
        return torch.promote_types(act, torch.float32)

    def zero_state(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(h, c) zeros of shape (L, B, d) in the state dtype for activations x (B, ·, d)."""
        z = x.new_zeros(len(self.lstm), x.shape[0], x.shape[-1], dtype=self.state_dtype(x.dtype))
        return z, z.clone()

    def run_stack(self, x: Tensor, h: Tensor, c: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """All layers over x (B, T, d) from (h, c) (L, B, d) -> (top output (B, T, d), h', c');
        `valid` (T,) bool or None as in `LSTMLayer.forward`."""
        hs, cs = [], []
        for n, layer in enumerate(self.lstm):
            x, hn, cn = layer(x, h[n], c[n], valid)
            hs.append(hn)
            cs.append(cn)
        return x, torch.stack(hs), torch.stack(cs)

    def stream(self, e: Tensor, pos: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`stream` mode. e (B, T, d) embeddings of absolute positions pos..pos+T-1 (pos: () int64).

        Returns memory vectors (B, ceil(T / C), d): vector k is chunk pos // C + k, summarized at
        its last token (a chunk ends at absolute position p with (p + 1) % chunk == 0); only the
        first (pos + T) // C - pos // C of them end in this segment, the rest are placeholders
        (the output at the segment's last token) that the caller must ignore. And the carried (h, c).
        """
        y, h, c = self.run_stack(e, h, c)
        C, T = self.chunk, e.shape[1]
        first = (C - 1 - pos) % C  # local index of the first chunk end in this segment
        ends = first + C * torch.arange(-(-T // C), device=e.device)
        return self.compressor(y[:, ends.clamp(max=T - 1)]), h, c

    def chunked(self, e: Tensor, n_chunks: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`chunked` mode. e (B, K*C, d): embeddings of K chunks, of which the first n_chunks
        (() int64, <= K) are whole chunks of the document and the rest placeholders.

        Returns memory vectors (B, K, d) (placeholders past n_chunks, to be ignored) and the
        carried chunk-level (h, c), which the placeholders leave unchanged.
        """
        B, n, d = e.shape
        C = self.chunk
        K = n // C
        xs = e.reshape(B * K, C, d)  # chunks are independent: batch them
        h0, c0 = self.zero_state(xs)
        y, _, _ = self.run_stack(xs, h0, c0)
        summaries = (y[:, -1] if self.pool == "last" else y.mean(dim=1)).reshape(B, K, d)
        valid = torch.arange(K, device=e.device) < n_chunks
        z, h, c = self.run_stack(summaries, h, c, valid)  # the same stack recurs over the chunk summaries
        return self.compressor(z), h, c
