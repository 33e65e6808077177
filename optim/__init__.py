"""optim: how low-precision weights learn.

Latent (STE) training uses any torch optimizer on the float master weights; latent-free training
updates weights in their own packed storage: :class:`Bop` (binary), :class:`TernaryBop` (ternary),
:class:`SRAdamW` (FP8 / FP4 / bf16 with stochastic rounding, moments in fp32 / bf16 / fp8).
:func:`build_optimizer` routes every weight of a model by its layer's precision into one
:class:`MixedOptimizer`; :func:`memory_report` measures what it all costs per parameter.
See ``docs/optim.md``.
"""

from .bop import Bop, TernaryBop
from .in_backward import InBackward, attach_in_backward
from .memory import MemoryReport, MemoryRow, memory_report
from .mixed import MixedOptimizer, build_optimizer, route
from .moments import MOMENT_DTYPES
from .schedule import Schedule, build_scheduler, two_stage_schedule, warmup_cosine
from .sr_adamw import SRAdamW

__all__ = [
    "Bop", "TernaryBop", "SRAdamW", "MixedOptimizer", "build_optimizer", "route", "attach_in_backward",
    "InBackward", "memory_report", "MemoryReport", "MemoryRow", "two_stage_schedule", "warmup_cosine",
    "build_scheduler", "Schedule", "MOMENT_DTYPES",
]
