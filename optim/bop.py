"""Latent-free optimizers for binary and ternary weights: Bop and its ternary extension.

Both update a native layer whose weight is ``W = s * c`` with codes ``c`` packed (binary: 1 bit,
``c in {-1, +1}``; ternary: 2 bits, ``c in {-1, 0, +1}``) and a float scale ``s`` per scale group
(one per tensor for the ``binary``/``ternary`` formats). No float copy of ``W`` exists.

Gradients. Backward gives ``G = dL/dW`` (fp32, ``layer.native_grad``). The codes see
``g = dL/dc = s * G`` (the gradient with respect to the +-1 / ternary weight itself, as in the
paper, whose binary networks have no scale), and the scale of group ``k`` sees
``dL/ds_k = sum_{i in k} G_i c_i``.

Bop (Helwegen et al., "Latent Weights Do Not Exist: Rethinking Binarized Neural Network
Optimization", NeurIPS 2019, Algorithm 1), per element::

    m_t = (1 - gamma) m_{t-1} + gamma g_t                              (gamma: adaptivity rate, in (0, 1])
    c_t = -c_{t-1}  if |m_t| > tau and sign(m_t) = sign(c_{t-1})       (tau: threshold, >= 0)
          c_{t-1}   otherwise

A positive ``m`` says the loss grows with ``c``: a weight at +1 that the gradient keeps pushing
down flips to -1 once the push is consistent (``|m| > tau``); a weight already agreeing with the
push (``sign(m) = -sign(c)``) stays. This is larq's ``Bop`` (``sign(-sign(w m - tau) w)``).
A flip needs no momentum reset: afterwards ``m`` opposes ``c``, so flipping back needs ``m`` to
cross to the other side of zero and past ``tau`` (hysteresis of at least ``tau``).

TernaryBop (this project's ternary rule), per element::

    m_t = (1 - gamma) m_{t-1} + gamma g_t
    c_t = clip(c_{t-1} - sign(m_t) [|m_t| > tau], -1, +1)               one step along -sign(m): -1 <-> 0 <-> +1
    m_t = 0  where c_t != c_{t-1}                                       reset the momentum of moved weights

For ``c = +-1`` this is Bop's rule with "flip" replaced by "step to 0" (a step outward is clipped:
the weight already agrees with the push, and its momentum is kept). Why the reset: with three
states Bop's hysteresis is gone, since after ``+1 -> 0`` the same momentum (still ``> tau``) would
move ``0 -> -1`` on the very next step with no new evidence, so zero would never be a state a weight
rests in. Resetting makes every transition need fresh evidence: ``|m|`` must grow again from 0 to
``tau`` (at least ``log(1 - tau / |E g|) / log(1 - gamma)`` steps for a steady push ``E g``). The
alternative ``m <- m - tau sign(m)`` (keep the surplus) turns ``m`` into an accumulator, a latent
weight in disguise; the reset keeps ``m`` a pure gradient average, as in Bop.

The scale. Flips cannot change ``s`` and ``s = mean|W|`` would be a constant of the codes, so
``s`` is a small float parameter (one fp32 per scale group) learned by Adam (the ordinary
optimizer's rule, with this group's ``lr``, ``betas``, ``eps``; ``lr = 0`` keeps it fixed at its
initial absmean) in log space::

    l = log s,   dL/dl = s dL/ds = s sum_{i in k} G_i c_i,   l <- Adam(l, dL/dl),   s = max(exp(l), 1e-5)

Adam's step is about ``lr`` in the parameter's own units whatever the gradient's size; on ``s``
itself that would be an absolute step, fatal to a layer whose scale is ``~lr`` (measured: a
2e-3-scale layer of the hybrid model hit the 1e-5 floor in two steps at lr 2e-3). On ``log s`` it
is a relative step of about ``lr`` per step, for every layer alike, and ``s`` stays positive.
Learning rate schedulers act on ``lr``, i.e. on the scale; ``gamma`` and ``tau`` are constant
unless set in the param group.

State per layer: ``momentum`` (``(G, N)`` in ``momentum_dtype``: ``bf16`` by default, written with
stochastic rounding, see :mod:`optim.moments`; or ``fp32``), ``scale_exp_avg``,
``scale_exp_avg_sq`` (fp32, one per scale group), ``step`` (a 0-d fp32 tensor), ``draws`` (a 0-d
int64 tensor: the updates tried, skipped ones included) and ``noise_key`` (a 0-d int64 tensor made
from the optimizer's seed and the layer's position), which pick the stochastic rounding's noise
(:func:`lowprec.rounding.counter_uniform`: a hash of key, count and element, computed inside the
update's kernels, with no generator to reseed), and ``calls`` (see :mod:`optim.base`). Every state
tensor is updated in place. Resident bytes per weight, bf16 momentum: binary 1/8 + 2 = 2.125,
ternary 2/8 + 2 = 2.25, plus 12 bytes per scale group and 20 per layer.

Running it: each layer's update is one function of tensors written in place (`layer_step`), compiled
on CUDA (two or three small graphs for a whole model: the layers' shapes become symbolic after the
second), and from the second ``step()`` with the same layers, gradients and state, a param group's
whole update is replayed as one CUDA graph (the gradients and ``lr`` copied into it; a group whose
gradients exceed ``GRAPH_MAX_BYTES`` runs its compiled updates one by one).
"""

from __future__ import annotations

import abc

import torch

import lowprec
from lowprec.common import check_real
from lowprec.cuda_graphs import GraphCache
from lowprec.packing import pack_codes, unpack_codes
from lowprec.qtensor import QTensor
from lowprec.rounding import counter_uniform, round_float_grid
from lowprec.scaling import ABSMEAN_EPS, to_groups

from .base import TargetOptimizer, check_betas, describe_target, is_native_layer, local, shard_coordinate
from .moments import check_moment_dtype, noise_seed, store_zeros

MOMENTUM_DTYPES = ("fp32", "bf16")
_BF16 = lowprec.format("bf16")


def code_step(values, transition, bits: int, data, g_w, s, m, noise, gamma: float, tau: float):
    """The elementwise part of one update of a layer (the module doc's rule) -> (new packed codes,
    new stored momentum, dL/dlog s per scale group). ``g_w`` (G, N) fp32 gradient in scale groups,
    ``s`` (G, 1) scales, ``m`` the stored momentum (fp32, or bf16 with ``noise``: U[0, 1) draws
    shaped like it for its stochastic rounding), ``values`` / ``transition`` the optimizer's rule.

    One function of tensors and constants, so that on CUDA it runs compiled (inside `layer_step`):
    the unpacking, the momentum, the transition, the packing, the rounding and the scale's gradient
    in a few fused kernels instead of ~70 launches a layer. Compiled and eager compute the same ops;
    the fused kernels may round the fp32 momentum's ``lerp`` and the scale gradient's sum differently
    in the last bit."""
    codes = unpack_codes(data, bits, g_w.numel()).view(g_w.shape)
    c = values(codes)
    m = m.float().lerp(g_w * s, gamma)  # m + gamma (g - m), g = dL/dc
    data, moved = transition(data, codes, c, m, tau)
    if moved is not None:
        m = m.masked_fill(moved, 0.0)
    if noise is not None:  # bf16, rounded stochastically (what optim.moments.store writes)
        m = round_float_grid(m, _BF16, "stochastic", noise=noise).to(torch.bfloat16)
    return data, m, (g_w * c).sum(dim=1, keepdim=True) * s


def scale_step(s, dlog_s, t, exp_avg, exp_avg_sq, lr, b1: float, b2: float, eps: float):
    """Adam on ``log s`` (torch.optim.Adam's arithmetic) from ``dL/dlog s = s dL/ds``, floored at 1e-5
    -> (new scales, new first moment, new second moment). ``t``: the 0-d step tensor counting this
    update; ``lr`` a float or a 0-d float64 tensor (the same arithmetic)."""
    t = t.double()
    m = exp_avg.lerp(dlog_s, 1 - b1)
    v = exp_avg_sq.mul(b2).addcmul_(dlog_s, dlog_s, value=1 - b2)
    denom = (v.sqrt() / (1 - b2**t) ** 0.5).add_(eps)
    # exp(log s - step) written as s * exp(-step): exact when the step is 0 (lr = 0)
    return (s * torch.exp(m / denom * (-lr / (1 - b1**t)))).clamp_(min=ABSMEAN_EPS), m, v


def layer_step(rule, data, scale, g_w, s, m, key, draws, t, exp_avg, exp_avg_sq, lr, skip, gamma: float,
               tau: float, b1: float, b2: float, eps: float) -> None:
    """One update of one layer, every result written in place: its packed ``data`` and stored
    ``scale`` (the weight's storage), its stored momentum ``m`` (a view of the state, shaped like
    ``g_w``), ``t`` (the 0-d step count), the scale's Adam moments, and ``draws`` (the 0-d int64 count
    of updates tried, skipped ones included), which with the layer's ``key`` picks the momentum's
    stochastic-rounding noise (:func:`lowprec.rounding.counter_uniform`; bf16 momentum only). Where
    ``skip`` (a 0-d bool tensor, or None) is set, everything but ``draws`` keeps its old value, bit
    for bit. ``rule``: a class's `_rule`; ``lr`` a float or a 0-d float64 tensor.

    A function of tensors and constants written in place, so that on CUDA it runs compiled (a few
    fused kernels, the noise computed inside them) and a group's updates can be captured and replayed
    as one CUDA graph (`_CodeMomentumOptimizer`)."""
    draws.add_(1)
    noise = counter_uniform(m.shape, key, draws) if m.dtype == torch.bfloat16 else None
    t_new = t + 1
    new_data, new_m, dlog_s = rule(data, g_w, s, m, noise, gamma, tau)
    new_s, new_avg, new_avg_sq = scale_step(s, dlog_s, t_new, exp_avg, exp_avg_sq, lr, b1, b2, eps)
    new = (new_data.reshape(data.shape), new_s.reshape(scale.shape).to(scale.dtype), new_m, new_avg, new_avg_sq, t_new)
    for old, value in zip((data, scale, m, exp_avg, exp_avg_sq, t), new):
        old.copy_(value if skip is None else torch.where(skip, old, value))


_COMPILED: dict = {}
BACKEND = "inductor"  # the compiler backend of the compiled updates
COMPILE_ON = ("cuda",)  # the device types whose updates run compiled
GRAPHS_ON = ("cuda",)  # the device types whose param groups' updates are replayed as CUDA graphs (compiled ones)
GRAPH_MAX_BYTES = 1 << 30  # no graph for a group whose gradients exceed this: the graph copies them in


def _compiled_layer(rule, gamma: float, tau: float, b1: float, b2: float, eps: float):
    """`layer_step` of ``rule`` compiled, the group's constants written in (one compiled function per
    rule and constants; ``lr``, which schedules move, stays an input). Its first call compiles for
    that layer's shapes, a call with other shapes recompiles once with the shapes symbolic, and later
    layers reuse that graph: a model's update compiles two or three small graphs whatever its number
    of layers. A call past torch's recompile limit runs eagerly."""
    key = (rule, gamma, tau, b1, b2, eps)
    if key not in _COMPILED:
        def step(data, scale, g_w, s, m, key, draws, t, exp_avg, exp_avg_sq, lr, skip):
            layer_step(rule, data, scale, g_w, s, m, key, draws, t, exp_avg, exp_avg_sq, lr, skip, gamma, tau, b1, b2,
                       eps)
        compiled = torch.compile(step, fullgraph=True, backend=BACKEND)

        def call(*args):
            try:
                return compiled(*args)
            except (torch._dynamo.exc.FailOnRecompileLimitHit, torch._dynamo.exc.Unsupported):
                return step(*args)  # raised before the function ran: nothing to undo
        _COMPILED[key] = call
    return _COMPILED[key]


_LAYER_STATE = ("momentum", "noise_key", "draws", "step", "scale_exp_avg", "scale_exp_avg_sq")
_PER_LAYER = 2 + len(_LAYER_STATE)  # a layer's tensors written in place: its data and scale, then its state


class _CodeMomentumOptimizer(TargetOptimizer):
    """Shared frame of Bop and TernaryBop: momentum of ``dL/dc``, a code transition, the scale."""

    kind = ""  # weight format kind updated
    bits = 0  # packed bits per code

    def __init__(self, params, lr: float = 1e-3, gamma: float = 1e-4, threshold: float = 1e-8,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, momentum_dtype: str = "bf16",
                 seed: int = 0):
        defaults = {"lr": lr, "gamma": gamma, "threshold": threshold, "betas": betas, "eps": eps,
                    "momentum_dtype": momentum_dtype}
        super().__init__(params, defaults, seed)
        # a group's update replayed as one CUDA graph; its state tensors written where they are
        self._graphs = GraphCache(max_graphs=8, max_bytes=GRAPH_MAX_BYTES, mutating=True)

    def _check_group(self, group: dict) -> None:
        check_real("gamma", group["gamma"], "in (0, 1] (the adaptivity rate of the gradient average)",
                   lambda v: 0 < v <= 1)
        check_real("threshold", group["threshold"], ">= 0 (the momentum a weight must exceed to move)",
                   lambda v: v >= 0)
        check_real("lr", group["lr"], ">= 0 (the learning rate of the weight scale; 0 keeps it fixed)",
                   lambda v: v >= 0)
        group["betas"] = check_betas("betas", group["betas"])
        check_real("eps", group["eps"], "> 0", lambda v: v > 0)
        check_moment_dtype("momentum_dtype", group["momentum_dtype"], MOMENTUM_DTYPES)

    def _check_target(self, t) -> None:
        name = type(self).__name__
        if isinstance(t, torch.Tensor):
            raise TypeError(f"{name} updates native {self.kind} layers (lowprec QLinear/QEmbedding with "
                            f"storage='native' and a {self.kind} weight), not tensors; got {describe_target(t)}. "
                            "A float Parameter is a latent weight: give it to AdamW")
        if not is_native_layer(t):
            raise TypeError(f"{name} updates native {self.kind} layers; got {describe_target(t)}")
        kind = t.precision.weight.kind
        if kind != self.kind:
            rule = {"binary": "Bop", "ternary": "TernaryBop"}.get(kind, "SRAdamW")
            raise TypeError(f"{name} updates {self.kind} weights; {describe_target(t)} holds "
                            f"{t.precision.weight}: give it to {rule}")

    @staticmethod
    @abc.abstractmethod
    def _values(codes: torch.Tensor) -> torch.Tensor:
        """Element values (±1, or -1/0/+1) of the unpacked codes."""

    @staticmethod
    @abc.abstractmethod
    def _transition(data, codes, c, m, tau):
        """(new packed data, mask of moved weights or None)."""

    @staticmethod
    @abc.abstractmethod
    def _rule(data, g_w, s, m, noise, gamma, tau):
        """`code_step` with this class's `_values`, `_transition` and `bits` written in: a function
        of its own per class, so that a compiled one holds them as constants (a function shared by
        the rules would see ``bits`` change between calls and make it symbolic)."""

    def _init_state(self, group: dict, layer, st: dict) -> None:
        q = layer.native_weight
        groups = to_groups(torch.empty(q.shape, device="meta"), q.fmt)[1]
        store_zeros(st, "momentum", (groups.G, groups.N), group["momentum_dtype"], q.data.device)
        s = q.group_scales()
        st["scale_exp_avg"] = torch.zeros_like(s)
        st["scale_exp_avg_sq"] = torch.zeros_like(s)

    def _noise_state(self, layer, st: dict, index: int, grad: torch.Tensor) -> None:
        """The layer's noise key and device count of updates tried, made on its first update (or for a
        state saved without them: ``draws`` from the host count ``calls``, which `_begin` has moved)."""
        if "noise_key" not in st:
            target = index + (shard_coordinate(grad) << 32)  # the shards of one weight draw apart
            key = noise_seed(self.seed, type(self).__name__, target, 0)
            st["noise_key"] = torch.tensor(key, dtype=torch.int64).to(layer.w_data.device)
        if "draws" not in st:
            st["draws"] = torch.tensor(st["calls"] - 1, dtype=torch.int64).to(layer.w_data.device)

    def _step_group(self, group: dict, items: list, skip: torch.Tensor | None, graphs: bool = True) -> None:
        """Every layer of the group through `layer_step` (compiled on CUDA), the skip on the device flag
        inside it, everything written in place; on CUDA, from the second step of the same layers,
        gradients and state on, the whole group replayed as one CUDA graph (``graphs``: allowed)."""
        grads, fixed, layout = [], [], []
        for layer, grad, index in items:
            st = self._begin(group, layer)
            self._noise_state(layer, st, index, grad)
            q = layer.native_weight
            grads.append(local(grad))
            fixed += [q.data, q.scale, *(st[k] for k in _LAYER_STATE)]
            layout.append((q.fmt, tuple(q.shape), q.padded_last))
        device = grads[0].device
        constants = (group["gamma"], group["threshold"], *group["betas"], group["eps"])
        if device.type in COMPILE_ON:
            update = _compiled_layer(self._rule, *constants)
            lr = torch.full((), group["lr"], dtype=torch.float64, device=device)  # an input: schedules move it
        else:
            def update(*args):
                layer_step(self._rule, *args, *constants)
            lr = group["lr"]

        def run(lr, skip, *tensors):
            for i, (fmt, shape, padded) in enumerate(layout):
                first = len(layout) + _PER_LAYER * i
                data, scale, m, key, draws, t, exp_avg, exp_avg_sq = tensors[first:first + _PER_LAYER]
                g_w, _ = to_groups(tensors[i], fmt)  # (G, N) fp32, block padding zero
                s = QTensor(data, scale, None, fmt, shape, padded).group_scales()
                update(data, scale, g_w, s, m.view(g_w.shape), key, draws, t, exp_avg, exp_avg_sq, lr, skip)

        if graphs and device.type in GRAPHS_ON and device.type in COMPILE_ON:
            self._graphs(run, [lr, skip, *grads], fixed, (self._rule, constants, tuple(layout)))
        else:
            run(lr, skip, *grads, *fixed)

    def _apply(self, group: dict, layer, grad: torch.Tensor, index: int, skip: torch.Tensor | None = None) -> None:
        self._step_group(group, [(layer, grad, index)], skip, graphs=False)  # one layer, in backward: no graph

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._graphs.clear()  # the graphs wrote the replaced state tensors


class Bop(_CodeMomentumOptimizer):
    """Binary optimizer (Helwegen et al. 2019) for native binary layers; math in the module doc.

    Args:
        params: native binary layers (``lowprec.nn.QLinear``/``QEmbedding`` with
            ``storage="native"`` and a ``binary`` weight), or param-group dicts of them.
        gamma: adaptivity rate of the gradient average, in (0, 1] (paper: 1e-4).
        threshold: tau, >= 0 (paper: 1e-8); in units of ``dL/dc``.
        lr, betas, eps: Adam for the scale (``lr = 0``: fixed scale).
        momentum_dtype: ``"bf16"`` (stochastic rounding) or ``"fp32"``.
        seed: seeds the stochastic rounding of the momentum.
    """

    kind, bits = "binary", 1

    @staticmethod
    def _values(codes):
        return codes.to(torch.float32) * 2 - 1

    @staticmethod
    def _transition(data, codes, c, m, tau):
        flip = (m.abs() > tau) & (m * c > 0)
        return data ^ pack_codes(flip, 1).reshape(data.shape), None  # flipping a sign is flipping its bit

    @staticmethod
    def _rule(data, g_w, s, m, noise, gamma, tau):
        return code_step(Bop._values, Bop._transition, Bop.bits, data, g_w, s, m, noise, gamma, tau)


class TernaryBop(_CodeMomentumOptimizer):
    """Latent-free ternary rule (momentum-driven -1 <-> 0 <-> +1 steps); math in the module doc.

    Args as :class:`Bop`, for native ``ternary`` layers."""

    kind, bits = "ternary", 2

    @staticmethod
    def _values(codes):
        return codes.to(torch.float32) - 1

    @staticmethod
    def _transition(data, codes, c, m, tau):
        step = torch.where(m.abs() > tau, -torch.sign(m), 0.0)
        new = (c + step).clamp_(-1, 1)
        return pack_codes((new + 1).to(torch.uint8), 2), new != c

    @staticmethod
    def _rule(data, g_w, s, m, noise, gamma, tau):
        return code_step(TernaryBop._values, TernaryBop._transition, TernaryBop.bits, data, g_w, s, m, noise, gamma,
                         tau)


__all__ = ["MOMENTUM_DTYPES", "Bop", "TernaryBop"]
