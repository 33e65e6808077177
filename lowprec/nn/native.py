"""Native weight storage: a weight that exists only in its packed format between steps.

A layer with ``storage="native"`` keeps its weight as the buffers of a :class:`QTensor`
(``w_data`` packed codes, ``w_scale``, ``w_global``) — no float copy. Each forward dequantizes it
transiently. The weight gradient is not a ``Parameter.grad`` (there is no float parameter): it is
accumulated into ``layer.native_grad`` (fp32), or handed to ``layer.native_grad_hook(layer, grad)``
as soon as backward produces it (an optimizer can update the layer right there, so full-precision
gradients never exist for the whole model at once). Optimizers write the new weight back with
``set_native_weight``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..qtensor import QTensor, predicted_nbytes, quantize


class NativeWeightMixin:
    """Shared by QLinear and QEmbedding. Needs ``self.precision`` set."""

    cache_weights = True

    def weight_cache(self, key, weight, amax, make):
        """``make()``, reused while the weight is unchanged (eager mode only).

        A layer called many times per step (an LSTM's recurrent projection runs once per token)
        would otherwise quantize the same weight every call. The key holds the weight's version
        counter (bumped by every in-place update, i.e. every optimizer step) and storage; delayed
        scaling (a changing amax) and compiled graphs bypass the cache. Costs the quantized copy
        (FP8 codes on tensor cores, fp32 on the emulated backend) between uses; set
        ``cache_weights = False`` to trade that memory for recomputation."""
        if amax is not None or not self.cache_weights or torch.compiler.is_compiling():
            return make()
        if weight is None:
            tag = (key, "native", self._w_version, self.w_data.data_ptr())
        else:
            tag = (key, weight._version, weight.data_ptr())
        cache = self.__dict__.setdefault("_wcache", {})
        hit = cache.get(key)
        if hit is not None and hit[0] == tag:
            return hit[1]
        value = make()
        cache[key] = (tag, value)
        return value

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
        self.register_buffer("w_data", q.data)
        self.register_buffer("w_scale", q.scale)
        self.register_buffer("w_global", q.global_scale)
        self._w_shape = tuple(weight.shape)
        self._w_padded_last = q.padded_last
        self._w_version = 0
        self._fp8_cache = None
        self.native_grad = None
        self.native_grad_hook = None

    @property
    def native_weight(self) -> QTensor:
        """The weight as a QTensor (views of this module's buffers)."""
        return QTensor(self.w_data, self.w_scale, self.w_global, self.precision.weight, self._w_shape, self._w_padded_last)

    @torch.no_grad()
    def set_native_weight(self, q: QTensor) -> None:
        """Replace the weight by ``q`` (same format and shape), in place."""
        if q.fmt != self.precision.weight or tuple(q.shape) != self._w_shape:
            raise ValueError(f"set_native_weight: expected {self.precision.weight} {self._w_shape}, got {q.fmt} {tuple(q.shape)}")
        for name, t in (("w_data", q.data), ("w_scale", q.scale), ("w_global", q.global_scale)):
            if t is None:
                continue
            buf = getattr(self, name)
            if buf.shape == t.shape and buf.dtype == t.dtype:
                buf.copy_(t)
            else:
                setattr(self, name, t.to(buf.device))
        self._w_version += 1
        self._fp8_cache = None

    def accumulate_native_grad(self, grad: torch.Tensor) -> None:
        grad = grad.float()
        if self.native_grad_hook is not None:
            self.native_grad_hook(self, grad)
        elif self.native_grad is None:
            self.native_grad = grad
        else:
            self.native_grad += grad

    def zero_native_grad(self) -> None:
        self.native_grad = None

    def dequantized_native(self) -> torch.Tensor:
        """The native weight in fp32, transient (kept only while the weight version is unchanged
        and caching is on; see ``QLinear.weight_cache``)."""
        return self.weight_cache(("native",), None, None, lambda: self.native_weight.dequantize(torch.float32))

    def native_fp8_operand(self):
        """(codes as float8 E4M3, scale) of the native weight for FP8 GEMMs, cached per version."""
        if self._fp8_cache is None or self._fp8_cache[0] != self._w_version:
            q = self.native_weight
            codes = q.values().reshape(q.shape[0], -1)[:, : q.shape[-1]].to(torch.float8_e4m3fn)
            s = q.group_scales()
            s = s.reshape(1) if s.numel() == 1 else s.reshape(-1, 1)
            self._fp8_cache = (self._w_version, codes, s)
        return self._fp8_cache[1], self._fp8_cache[2]

    def native_nbytes(self) -> int:
        if self.w_data.device.type == "meta":
            return self._meta_nbytes
        return self.native_weight.nbytes


def resident_param_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def check_module_precision(precision) -> None:
    from ..precision import LayerPrecision

    if not isinstance(precision, LayerPrecision):
        raise TypeError(f"precision must be a lowprec.LayerPrecision, got {type(precision).__name__}")


__all__ = ["NativeWeightMixin", "resident_param_bytes", "check_module_precision", "nn"]
