"""Native weight storage: a weight that exists only in its packed format between steps.

A layer with ``storage="native"`` keeps its weight as the buffers of a :class:`QTensor`
(``w_data`` packed codes, ``w_scale``, ``w_global``) — no float copy. Each forward derives the
operand its kernel needs (FP8 codes, or dequantized values) from the codes; that operand lives only
while the step's autograd graph holds it (:class:`OperandCache`). The buffers are plain tensors:
where a weight row fills whole bytes, ``w_data`` is ``(out_features, row_bytes)`` and row ``n``
packs row ``n`` of the weight, so ``state_dict``, ``torch.distributed.checkpoint`` and a row-wise
(dim-0) shard see the packed form. The weight gradient is not a ``Parameter.grad`` (there is no float parameter): it is
accumulated by autograd into ``layer.native_grad`` (fp32; the ``.grad`` of a stride-0 carrier
tensor), or handed to ``layer.native_grad_hook(layer, grad)``
as soon as backward produces it (an optimizer can update the layer right there, so full-precision
gradients never exist for the whole model at once). Optimizers write the new weight back with
``set_native_weight``.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn as nn

from ..qtensor import QTensor, _packed_bits, predicted_nbytes, quantize


class OperandCache:
    """Quantized operands derived from a layer's weight, shared by every call of one training step
    and freed with it.

    A layer called many times per step (an LSTM's recurrent projection runs once per token) would
    otherwise quantize the same weight at every call. Entries are *weak* references tagged with the
    weight's version counters (bumped by every in-place update, i.e. every optimizer step): an
    operand stays reachable exactly as long as an autograd graph holds it for backward, so no
    quantized or dequantized copy of a weight outlives the step that made it. Compiled graphs
    bypass the cache (the compiler shares the operand itself)."""

    def __init__(self):
        self._entries: dict = {}

    def get(self, key, tag, make):
        if torch.compiler.is_compiling():
            return make()
        hit = self._entries.get(key)
        if hit is not None and hit[0] == tag:
            value = tuple(None if r is None else r() for r in hit[1])
            if all(v is not None for v, r in zip(value, hit[1]) if r is not None):
                return value
        value = make()
        self._entries[key] = (tag, tuple(None if v is None else weakref.ref(v) for v in value))
        return value


class NativeWeightMixin:
    """The owner of a layer's weight, shared by QLinear and QEmbedding (needs ``self.precision``):
    the packed codes and scales of a native weight (buffers ``w_data``, ``w_scale``, ``w_global``)
    or the float master of a latent one (``weight``), and the operand cache derived from either."""

    @property
    def is_native(self) -> bool:
        return self.precision.storage == "native"

    def _init_native(self, weight: torch.Tensor) -> None:
        fmt = self.precision.weight
        if weight.device.type == "meta":
            # shapes only: the buffers get the right sizes and dtypes, no data is touched
            q = quantize(torch.zeros((1,) * weight.dim(), dtype=torch.float32), fmt)
            q = QTensor(
                torch.empty(0, dtype=q.data.dtype, device="meta"),
                None if q.scale is None else torch.empty(0, dtype=q.scale.dtype, device="meta"),
                None if q.global_scale is None else torch.empty((), device="meta"),
                fmt, weight.shape, weight.shape[-1],
            )
            self._meta_nbytes = predicted_nbytes(weight.shape, fmt)
        else:
            q = quantize(weight.detach(), fmt)
        data = q.data
        bits = 8 * data.element_size() if data.dtype != torch.uint8 else _packed_bits(fmt)
        if data.numel() and data.dim() == 1 and len(weight.shape) == 2 and (q.padded_last * bits) % 8 == 0:
            data = data.reshape(weight.shape[0], -1)  # one row of bytes per weight row (shardable)
        self.register_buffer("w_data", data)
        self.register_buffer("w_scale", q.scale)
        self.register_buffer("w_global", q.global_scale)
        self._w_shape = tuple(weight.shape)
        self._w_padded_last = q.padded_last
        self.native_grad_hook = None
        self._place_grad_carrier(weight.device)

    def __setstate__(self, state):
        # a copy (copy.deepcopy, pickle) needs its own carrier: the hook is not copied with it
        super().__setstate__(state)
        old = self.__dict__.pop("_grad_carrier", None)
        if old is not None:
            self._place_grad_carrier(old.device)
            self.native_grad = old.grad

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self.is_native:
            self._place_grad_carrier(self.w_data.device)
        return out

    # ---- the weight gradient ---------------------------------------------------------------------
    def _place_grad_carrier(self, device) -> None:
        """The tensor autograd delivers the native weight's gradient to: a leaf of the weight's shape
        whose strides are all 0 (4 bytes of storage), so ``carrier.grad`` is an ordinary, dense fp32
        gradient accumulated by autograd itself: no Python side effect in backward, which compiled
        graphs could not trace."""
        old = getattr(self, "_grad_carrier", None)
        if old is not None and old.device == torch.device(device):
            return
        c = torch.empty_strided(self._w_shape, (0,) * len(self._w_shape), device=device).zero_().requires_grad_()
        if old is not None and old.grad is not None:
            c.grad = old.grad.to(device)
        # the hook lives in C++, out of the garbage collector's sight: a strong reference to the
        # layer would keep every discarded native layer alive
        c.register_post_accumulate_grad_hook(functools.partial(_on_grad_accumulated, weakref.ref(self)))
        self._grad_carrier = c

    @property
    def native_grad(self) -> torch.Tensor | None:
        """The native weight's fp32 gradient accumulated so far (None after ``zero_native_grad``)."""
        return self._grad_carrier.grad

    @native_grad.setter
    def native_grad(self, grad) -> None:
        self._grad_carrier.grad = grad

    @property
    def native_weight(self) -> QTensor:
        """The weight as a QTensor (views of this module's buffers)."""
        return QTensor(self.w_data, self.w_scale, self.w_global, self.precision.weight, self._w_shape, self._w_padded_last)

    @torch.no_grad()
    def init_native_(self, weight: torch.Tensor) -> None:
        """Quantize the float ``weight`` (this layer's whole shape, on any device) into the native
        storage, replacing what is there: for a layer built on the meta device (whose buffers are
        empty), the step that gives it codes without materializing the float model around it."""
        if tuple(weight.shape) != self._w_shape:
            raise ValueError(f"init_native_: expected a weight of shape {self._w_shape}, got {tuple(weight.shape)}")
        self._init_native(weight.float())

    @torch.no_grad()
    def set_native_weight(self, q: QTensor) -> None:
        """Replace the weight by ``q`` (same format and shape), in place."""
        if q.fmt != self.precision.weight or tuple(q.shape) != self._w_shape:
            raise ValueError(f"set_native_weight: expected {self.precision.weight} {self._w_shape}, got {q.fmt} {tuple(q.shape)}")
        for name, t in (("w_data", q.data), ("w_scale", q.scale), ("w_global", q.global_scale)):
            if t is None:
                continue
            buf = getattr(self, name)
            if buf.numel() == t.numel() and buf.dtype == t.dtype:
                buf.copy_(t.reshape(buf.shape))
            else:
                setattr(self, name, t.to(buf.device))

    def accumulate_native_grad(self, grad: torch.Tensor) -> None:
        grad = grad.float()
        if self.native_grad_hook is not None:
            self.native_grad_hook(self, grad)
        elif self.native_grad is None:
            self.native_grad = grad
            _mark_split(self, grad)
        else:
            self.native_grad += grad

    def zero_native_grad(self) -> None:
        self.native_grad = None

    def native_nbytes(self) -> int:
        if self.w_data.device.type == "meta":
            return self._meta_nbytes
        return self.native_weight.nbytes


def _on_grad_accumulated(layer_ref, carrier) -> None:
    layer = layer_ref()
    if layer is not None and layer.native_grad_hook is not None:  # hand the gradient over (in-backward update)
        g, carrier.grad = carrier.grad, None
        layer.native_grad_hook(layer, g)
    elif layer is not None and carrier.grad is not None:
        _mark_split(layer, carrier.grad)


def _mark_split(layer, grad: torch.Tensor) -> None:
    """A gradient of a piece that tensor parallelism gave this rank alone says so
    (``grad.split_over_tp``): a norm over the ranks counts it once, not once per rank."""
    if getattr(layer, "_native_tp", None) is not None:
        grad.split_over_tp = True


def resident_param_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def check_module_precision(precision) -> None:
    from ..precision import LayerPrecision

    if not isinstance(precision, LayerPrecision):
        raise TypeError(f"precision must be a lowprec.LayerPrecision, got {type(precision).__name__}")


__all__ = ["NativeWeightMixin", "OperandCache", "resident_param_bytes", "check_module_precision", "nn"]
