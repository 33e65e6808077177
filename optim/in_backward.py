"""Update native layers inside backward, as soon as each layer's gradient is complete.

Without this, backward accumulates an fp32 ``native_grad`` for every native layer and ``step()``
consumes them afterwards: at the step the whole model's gradients exist at once (4 bytes per
weight on top of the packed weight and the state). With it, each layer is updated the moment its
gradient is complete and the gradient is freed, so at most the gradients of the layers whose
backward is in flight exist at once (one layer's, for a plain stack).

"Complete": a layer called ``k`` times in the forward (a recurrent weight applied per time step, a
shared layer) receives ``k`` gradient contributions; autograd sums them into the layer's gradient
carrier (:mod:`lowprec.nn.native`) and calls the hook once per backward pass, with the sum.

Loss scaling: pass ``scaler`` (a ``lowprec.LossScaler``) and each layer's gradient is divided by
its current scale before the update; a layer whose gradient holds inf/NaN is *not* updated and
keeps its gradient, so that the following ``scaler.step(optimizer)`` finds it, skips the step of
the other parameters and backs the scale off. Layers updated earlier in that backward are not
rolled back (the price of not holding all gradients): use it with a scale that rarely overflows.
Gradient accumulation over micro-batches does not combine with it (each backward updates).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import TargetOptimizer


def _native_parts(optimizer) -> list[TargetOptimizer]:
    parts = getattr(optimizer, "parts", None)
    opts = list(parts.values()) if parts is not None else [optimizer]
    return [o for o in opts if isinstance(o, TargetOptimizer)]


class InBackward:
    """Handle of :func:`attach_in_backward`: ``remove()`` restores ordinary accumulation.
    ``updated`` counts layers updated inside backward since attaching."""

    def __init__(self, optimizer, scaler=None):
        self.scaler = scaler
        self.updated = 0
        self._owner: dict[int, TargetOptimizer] = {}
        self._layers: list[nn.Module] = []
        for part in _native_parts(optimizer):
            for group in part.param_groups:
                for layer in group["layers"]:
                    if layer.native_grad_hook is not None:
                        raise ValueError(f"{type(layer).__name__} already has a native_grad_hook; "
                                         "remove the other handle first")
                    self._owner[id(layer)] = part
                    self._layers.append(layer)
        if not self._layers:
            raise ValueError("attach_in_backward: the optimizer updates no native layers")
        for layer in self._layers:
            layer.native_grad_hook = self._on_grad

    def _on_grad(self, layer, grad: torch.Tensor) -> None:
        layer.native_grad = grad if layer.native_grad is None else layer.native_grad.add_(grad)
        g = layer.native_grad
        if self.scaler is not None:
            g.mul_(1.0 / self.scaler.loss_scale)  # power-of-two scales: exact
            if not bool(torch.isfinite(g).all()):
                return  # left for scaler.step to find (it skips the step and backs off)
        self._owner[id(layer)].update_now(layer, g)
        layer.native_grad = None
        self.updated += 1

    def remove(self) -> None:
        for layer in self._layers:
            if layer.native_grad_hook == self._on_grad:
                layer.native_grad_hook = None


def attach_in_backward(model: nn.Module, optimizer, scaler=None) -> InBackward:
    """Update every native layer of ``optimizer`` (a :class:`~optim.MixedOptimizer` or a Bop /
    TernaryBop / SRAdamW) inside backward; see the module doc. ``model`` is accepted for symmetry
    with ``build_optimizer`` and checked to contain those layers."""
    handle = InBackward(optimizer, scaler)
    inside = {id(m) for m in model.modules()}
    stray = [layer for layer in handle._layers if id(layer) not in inside]
    if stray:
        handle.remove()
        raise ValueError(f"attach_in_backward: {len(stray)} native layer(s) of the optimizer are not in the model")
    return handle


__all__ = ["attach_in_backward", "InBackward"]
