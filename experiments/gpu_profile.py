"""Where one training step's time goes on a GPU: the benchmarks' ``--profile``.

    prof, wall = profile_call(step, torch.cuda.synchronize, shapes=True)
    lines = step_report(prof, wall)          # kernels, idle time, host waits
    lines += operator_report(prof)           # the operators whose kernels took the time
    where = host_syncs(step)                 # the Python lines that waited

``step_report`` reads one profiled call: its wall time, the time some kernel or copy ran (the
union of their intervals), how many kernels and copies (memcpy, memset) ran, the collectives'
kernel time and the part of it beside no other kernel, the host's waits for the device (CUDA
runtime calls whose name says ``Synchronize``, the final synchronization of the measurement
included), the kernels' time and count by kind (GEMM, attention, FP8 operand passes, compiled
reductions and pointwise kernels, ...: :func:`kernel_kinds`), the kernels taking most time, and the host's own
time in its CPU-side operations. ``operator_report`` gives the kernels' time by the operator that launched them
(an ATen operator, a custom operator, a compiled kernel's launch) and its input shapes: where a kind's time
comes from in the model. ``host_syncs`` runs a call under
``torch.cuda.set_sync_debug_mode("warn")`` and returns where each synchronizing operation was
called from: a step that should queue its work without waiting (the trainer's step does) names
its offenders there.
"""
from __future__ import annotations

import time
import warnings
from collections import Counter
from collections.abc import Callable

import torch

__all__ = ["host_syncs", "kernel_kinds", "operator_report", "profile_call", "step_report", "sync_report",
           "sync_sites", "union_length"]


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def profile_call(fn: Callable[[], object], sync: Callable[[], None], shapes: bool = False):
    """``fn()`` once under ``torch.profiler`` (CPU and, where there is one, CUDA activity), between
    two ``sync()``: ``(profile, wall seconds)``. ``shapes``: the operators' input shapes recorded too
    (for :func:`operator_report`; the host then spends a little longer on each operator)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sync()
    with profile(activities=acts, record_shapes=shapes) as prof:
        t = time.perf_counter()
        fn()
        sync()
        wall = time.perf_counter() - t
    return prof, wall


def _annotation(e) -> bool:
    """Whether a device-side event is a range the profiler marks on the GPU's timeline (a compiled graph's
    call, ``Optimizer.step#...``, a ``record_function``), not a kernel: it spans the kernels launched
    inside it (and the gaps between them)."""
    return bool(getattr(e, "is_user_annotation", False)) or e.name.startswith("## ")


def step_report(prof, wall_s: float, top: int = 15, top_host: int = 10) -> list[str]:
    """Printable lines about one profiled call (see the module doc): the summary, the host's
    waits, the ``top`` kernels by time, then the host's own time (``host ...`` lines: the time
    spent in CPU-side operations minus that of the operations they called, in all and for the
    ``top_host`` largest; a step whose GPU idles is bound by these)."""
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.elapsed_us() > 0
               and not _annotation(e)]
    comm = [(e.time_range.start, e.time_range.end) for e in kernels if "nccl" in e.name.lower()]
    other = [(e.time_range.start, e.time_range.end) for e in kernels if "nccl" not in e.name.lower()]
    busy, comm_t, other_t = union_length(comm + other), union_length(comm), union_length(other)
    waits: dict[str, list[float]] = {}
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CPU and "Synchronize" in e.name:
            waits.setdefault(e.name, []).append(e.time_range.elapsed_us())
    copies = sum(e.name.startswith(("Memcpy", "Memset")) for e in kernels)
    summary = (f"wall {wall_s * 1e3:.1f} ms: GPU idle {(wall_s * 1e6 - busy) / 1e3:.1f} ms; compute kernels "
               f"{other_t / 1e3:.1f} ms; collectives {comm_t / 1e3:.1f} ms, {(busy - other_t) / 1e3:.1f} ms of them "
               f"beside no compute kernel; {len(kernels) - copies} kernels, {copies} copies")
    waited = "; ".join(f"{n} {len(ts)} x {sum(ts) / 1e3:.1f} ms" for n, ts in sorted(waits.items()))
    lines = [summary, f"host waits: {waited or 'none recorded'}"]
    lines.append("by kind: " + "; ".join(f"{k} {ms:.2f} ms {n} x" for k, ms, n in kernel_kinds(
        [(e.name, e.time_range.elapsed_us()) for e in kernels])))
    by: dict[str, list[float]] = {}
    for e in kernels:
        by.setdefault(e.name[:90], []).append(e.time_range.elapsed_us())
    for name, ts in sorted(by.items(), key=lambda kv: -sum(kv[1]))[:top]:
        lines.append(f"{sum(ts) / 1e3:8.2f} ms {len(ts):5d} x  {name}")
    host = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    lines.append(f"host: {sum(e.self_cpu_time_total for e in host) / 1e3:.1f} ms of own time in "
                 f"{sum(e.count for e in host)} CPU-side operations")
    for e in sorted(host, key=lambda e: -e.self_cpu_time_total)[:top_host]:
        lines.append(f"host {e.self_cpu_time_total / 1e3:8.2f} ms {e.count:5d} x  {e.key[:90]}")
    return lines


def operator_report(prof, top: int = 15) -> list[str]:
    """Printable lines: the ``top`` operators by the device time of the kernels each launched itself (not
    through an operator it called), with their calls and input shapes (recorded where :func:`profile_call`
    had ``shapes``), after a line with the total they account for. An operator is what the host called: an
    ATen operator, a custom operator (its own launches: ``hybrid::lstm_recurrence`` its cells' kernels, its
    GEMMs under ``aten::mm``), a compiled graph's kernel launch. A CUDA graph's replay is one launch
    (``cudaGraphLaunch``) of all its kernels: profile without CUDA graphs to see its operators."""
    rows = [e for e in prof.key_averages(group_by_input_shape=True)
            if e.cpu_time_total > 0 and e.self_device_time_total > 0]
    rows.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in rows)
    lines = [f"operators: {total / 1e3:.1f} ms of kernel time launched by {sum(e.count for e in rows)} calls of "
             f"{len({e.key for e in rows})} operators"]
    for e in rows[:top]:
        shapes = ", ".join(str(list(s)) for s in e.input_shapes or () if s)
        lines.append(f"op {e.self_device_time_total / 1e3:8.2f} ms {e.count:5d} x  {e.key[:60]}"
                     + (f"  {shapes[:100]}" if shapes else ""))
    return lines


# a kernel's kind, from the first pattern its name contains (lower case), tried in this order
KINDS = (
    ("annotation", ("optimizer.step#",)),  # a range the profiler records around the optimizer's kernels
    ("copy", ("memcpy", "memset")),
    ("attention", ("sdpa", "flash", "fmha", "attention")),
    ("fp8 operand", ("_amax_kernel", "_cast_kernel")),
    ("gemm", ("nvjet", "gemm", "cutlass", "xmma", "splitkreduce", "cublas", "_scaled_mm", "sm90_")),
    ("optimizer", ("multi_tensor_apply", "adam", "_foreach", "optimizer")),
    ("compiled reduction", ("triton_red_", "triton_per_")),
    ("compiled pointwise", ("triton_poi_",)),
    ("other triton", ("triton_",)),
    ("aten reduction", ("reduce_kernel",)),
    ("aten elementwise", ("elementwise_kernel", "catarraybatchedcopy", "at::native")),
)


def kernel_kinds(kernels: list[tuple[str, float]]) -> list[tuple[str, float, int]]:
    """``[(kind, ms, count)]`` of ``(name, µs)`` kernels, the kinds of :data:`KINDS` (``other``: none
    matched), the most time first."""
    ms: dict[str, float] = {}
    count: Counter[str] = Counter()
    for name, us in kernels:
        low = name.lower()
        kind = next((k for k, pats in KINDS if any(p in low for p in pats)), "other")
        ms[kind] = ms.get(kind, 0.0) + us / 1e3
        count[kind] += 1
    return sorted(((k, ms[k], count[k]) for k in ms), key=lambda r: -r[1])


# the text of the warning CUDA's sync-debug mode raises at each synchronizing operation; setting the mode
# also warns once per process that the mode is a prototype, which names no synchronization
SYNC_WARNING = "called a synchronizing CUDA operation"


def host_syncs(fn: Callable[[], object]) -> list[tuple[str, int]] | None:
    """Run ``fn()`` with CUDA's synchronization warnings on: ``[(where, count)]``, the Python
    lines that called a synchronizing operation (``file:line``), most frequent first; ``[]`` when
    nothing synchronized. None without CUDA (nothing to check)."""
    if not torch.cuda.is_available():
        return None
    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(before)
    return sync_sites(caught)


def sync_sites(caught: list[warnings.WarningMessage]) -> list[tuple[str, int]]:
    """``[(file:line, count)]`` of the recorded warnings that report a synchronizing CUDA operation,
    most frequent first; every other warning (the sync-debug mode's own prototype notice among them)
    is left out."""
    where = Counter(f"{w.filename}:{w.lineno}" for w in caught if SYNC_WARNING in str(w.message))
    return where.most_common()


def sync_report(syncs: list[tuple[str, int]], top: int = 10) -> list[str]:
    """Printable lines of :func:`host_syncs`' answer: the total, then the ``top`` lines that waited."""
    return [f"{sum(n for _, n in syncs)} synchronizing calls in one step"] + [
        f"{n:5d} x  {where}" for where, n in syncs[:top]]
