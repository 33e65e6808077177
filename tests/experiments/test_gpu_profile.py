"""The benchmarks' ``--profile``: kernel accounting and the host-sync finder."""
import inspect
import re
import warnings

import pytest
import torch

from experiments.gpu_profile import (host_syncs, kernel_kinds, operator_report, profile_call, step_report,
                                     sync_report, sync_sites, union_length)


def test_union_length_counts_overlaps_once():
    assert union_length([]) == 0
    assert union_length([(5.0, 6.0), (0.0, 2.0), (1.0, 3.0)]) == 4.0   # [0, 3] and [5, 6]
    assert union_length([(0.0, 10.0), (2.0, 3.0)]) == 10.0              # one inside another


def test_host_syncs_without_cuda_has_nothing_to_check():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the GPU test below covers it")
    assert host_syncs(lambda: None) is None


def test_sync_sites_counts_only_the_synchronization_warnings():
    """Setting the sync-debug mode warns once per process that the mode is a prototype: that notice
    names no synchronization and is not counted; the per-operation warnings are, by line."""
    def record(message, lineno):
        return warnings.WarningMessage(UserWarning(message), UserWarning, "step.py", lineno)

    caught = [record("Synchronization debug mode is a prototype feature and does not yet detect all "
                     "synchronizing operations", 1),
              record("called a synchronizing CUDA operation", 7),
              record("called a synchronizing CUDA operation", 9),
              record("called a synchronizing CUDA operation", 7),
              record("an unrelated warning", 7)]
    assert sync_sites(caught) == [("step.py:7", 2), ("step.py:9", 1)]
    assert sync_sites(caught[:1]) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_profile_counts_kernels_and_finds_the_line_that_waits():
    a = torch.randn(1 << 20, device="cuda")
    b = torch.randn(1 << 20, device="cuda")
    torch.cuda.synchronize()

    def queued():  # three elementwise kernels, no wait
        c = a + b
        c.mul_(2)
        c.sub_(a)

    def waits():
        queued()
        return (a * b).sum().item()   # copies to the host: waits for the device

    prof, wall = profile_call(queued, torch.cuda.synchronize)
    lines = step_report(prof, wall)
    assert lines[0].endswith("; 3 kernels, 0 copies"), lines[0]
    assert "cudaStreamSynchronize" not in lines[1], lines[1]

    prof, wall = profile_call(waits, torch.cuda.synchronize)
    lines = step_report(prof, wall)
    kernels, copies = map(int, re.search(r"; (\d+) kernels, (\d+) copies$", lines[0]).groups())
    assert kernels == 5, lines[0]   # + the product, the sum
    # .item()'s device-to-host copy: the profiler shows it as more than one record on some builds (two
    # with torch 2.11 on an H200), so only that there is one is checked
    assert copies >= 1, lines[0]
    assert "cudaStreamSynchronize 1 x" in lines[1], lines[1]   # .item()'s (the final one is cudaDeviceSynchronize)

    assert host_syncs(queued) == []
    line = inspect.getsourcelines(waits)[1] + 2        # the line of .item()
    assert host_syncs(waits) == [(f"{__file__}:{line}", 1)]


def test_step_report_leaves_the_device_side_ranges_out():
    """Ranges the profiler marks on the GPU's timeline (a compiled graph's call, by its name; the optimizer's
    step, flagged as a user annotation) span kernels and the gaps between them: neither counts as a kernel
    nor as busy time (here two kernels busy 0.3 ms of a 1 ms call)."""
    from types import SimpleNamespace

    def event(name, start, end, annotation=False):
        span = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
        return SimpleNamespace(name=name, device_type=torch.autograd.DeviceType.CUDA, is_user_annotation=annotation,
                               time_range=span)

    events = [event("## Call CompiledFxGraph f0 ##", 0.0, 900.0), event("Optimizer.step#AdamW.step", 900.0, 1000.0, True),
              event("triton_poi_fused_add_0", 100.0, 200.0), event("nvjet_sm90_tst_128x64_64x8_1x2_h_bz_TNT", 300.0, 500.0)]
    prof = SimpleNamespace(events=lambda: events, key_averages=lambda: [])
    lines = step_report(prof, 1e-3)
    assert lines[0] == ("wall 1.0 ms: GPU idle 0.7 ms; compute kernels 0.3 ms; collectives 0.0 ms, 0.0 ms of them "
                        "beside no compute kernel; 2 kernels, 0 copies"), lines[0]
    assert lines[2] == "by kind: gemm 0.20 ms 1 x; compiled pointwise 0.10 ms 1 x", lines[2]


def test_operator_report_without_kernels():
    """A call that ran no kernel (the CPU) has no operator to name: the total line alone, at zero."""
    a = torch.randn(64, 64)
    prof, _ = profile_call(lambda: a @ a, lambda: None, shapes=True)
    assert operator_report(prof) == ["operators: 0.0 ms of kernel time launched by 0 calls of 0 operators"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_operator_report_names_the_operators_and_their_shapes():
    """Each kernel's time goes to the operator that launched it, grouped by input shapes: two products of
    one shape and one of another make two ``aten::mm`` lines (2 and 1 calls), the sum its own line."""
    a, b, c = (torch.randn(*s, device="cuda") for s in ((256, 512), (512, 128), (128, 64)))
    torch.cuda.synchronize()

    def call():
        (a @ b) @ c
        a @ b
        a.sum()

    prof, _ = profile_call(call, torch.cuda.synchronize, shapes=True)
    lines = operator_report(prof)
    # an operator's name may hold spaces; its shapes, when recorded, start with "["
    matches = [re.fullmatch(r"op +[\d.]+ ms +(\d+) x  (.+?)(?:  (\[.*))?", ln) for ln in lines[1:]]
    assert all(matches), lines
    ops = {m.group(2, 1, 3) for m in matches}
    assert ("aten::mm", "2", "[256, 512], [512, 128]") in ops, lines
    assert ("aten::mm", "1", "[256, 128], [128, 64]") in ops, lines
    assert any(op == "aten::sum" for op, _, _ in ops), lines
    assert re.fullmatch(r"operators: [\d.]+ ms of kernel time launched by \d+ calls of \d+ operators", lines[0])


def test_step_report_names_the_host_operations():
    """The host lines count the CPU-side operations and name the one that took the host longest
    (a 512x512 product against a 2-element sum: the product's own time dominates on any CPU)."""
    a, b = torch.randn(512, 512), torch.ones(2)

    def call():
        (a @ a).sum()
        b.sum()

    prof, wall = profile_call(call, lambda: None)
    lines = step_report(prof, wall, top_host=1)
    host = [ln for ln in lines if ln.startswith("host")]
    assert re.fullmatch(r"host: [\d.]+ ms of own time in \d+ CPU-side operations", host[1]), host
    assert len(host) == 3 and host[2].endswith("aten::mm"), host


def test_sync_report_totals_and_lists_the_lines():
    syncs = [("a.py:3", 2), ("b.py:9", 1)]
    assert sync_report(syncs) == ["3 synchronizing calls in one step", "    2 x  a.py:3", "    1 x  b.py:9"]
    assert sync_report(syncs, top=1) == ["3 synchronizing calls in one step", "    2 x  a.py:3"]
    assert sync_report([]) == ["0 synchronizing calls in one step"]


def test_kernel_kinds_sorts_kernels_by_kind():
    """Each kernel name goes to the first kind whose pattern it contains (an FP8 operand's Triton pass
    before the compiler's kernels, cuBLAS's split-K reduction with the GEMMs); the kinds come most
    time first, with their time and count; a name no pattern matches is ``other``."""
    kernels = [("nvjet_sm90_qqtst_256x128_128x4_1x2_h_bz_coopA_TNT", 80.0),
               ("void cublasLt::splitKreduce_kernel<32, 16, int, float>", 5.0),
               ("_cast_kernel", 14.0), ("_cast_kernel", 12.0), ("_amax_kernel", 7.0),
               ("triton_red_fused_abs_amax_gelu_view_12", 52.0), ("triton_per_fused_native_layer_norm_3", 3.0),
               ("triton_poi_fused_gelu_view_6", 50.0),
               ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", 21.0),
               ("Memset (Device)", 1.0), ("some_kernel_of_a_library", 2.0), ("Optimizer.step#AdamW.step", 0.5)]
    got = kernel_kinds(kernels)
    assert [k for k, _, _ in got] == ["gemm", "compiled reduction", "compiled pointwise", "fp8 operand",
                                      "attention", "other", "copy", "annotation"]
    by = {k: (round(ms, 3), n) for k, ms, n in got}
    assert by["gemm"] == (0.085, 2) and by["fp8 operand"] == (0.033, 3) and by["compiled reduction"] == (0.055, 2)
    assert by["other"] == (0.002, 1) and by["copy"] == (0.001, 1)
    assert kernel_kinds([]) == []
