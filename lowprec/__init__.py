"""lowprec: number formats, exact quantization, packed tensors and STE for low-precision training."""

from .formats import FORMATS, Format, format
from .qtensor import QTensor, quantize
from .quantize import quantize_dequantize
from .ste import STES, fake_quantize

__all__ = ["FORMATS", "Format", "format", "QTensor", "quantize", "quantize_dequantize", "fake_quantize", "STES"]
