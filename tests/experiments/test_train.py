"""experiments.train end to end: the Hydra app, TensorBoard, checkpoints, exact resume, NaN stop, bad input.

Runs use the tiny preset (chunked memory, for speed) on a small local corpus cut from the plays,
one thread, in this process (conftest.py); the Hydra app's ``main`` runs in this process too.
"""
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from experiments.build import ConfigError
from experiments.checkpoint import CheckpointManager, CorruptCheckpointError, load_checkpoint, save_checkpoint
from experiments.train import NonFiniteError, main, train


# the shared 6-step run that several tests read (conftest.trained_run): checkpoints at 3 and 6
RUN6 = ("train.steps=6", "train.ckpt_every=3", "train.sample_tokens=0")


@pytest.fixture
def cfg(corpus, cfg_of):
    """``cfg(run_dir, *overrides)``: a tiny run's config on the shared corpus."""
    return lambda run_dir, *extra: cfg_of(corpus, run_dir, *extra)


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ------------------------------------------------------------------------------ end to end

@pytest.fixture
def run_app(monkeypatch, capsys):
    """``run_app(*args) -> (exit status, stdout, stderr)``: the Hydra app ``main`` in this process,
    as ``python -m experiments.train *args`` runs it (no new interpreter, torch and Hydra to start);
    the logging handlers Hydra installs are removed afterwards (they would write into this test's
    captured streams)."""
    root = logging.getLogger()

    def run(*args: str) -> tuple[int, str, str]:
        handlers, level = list(root.handlers), root.level
        monkeypatch.setattr(sys, "argv", ["experiments.train", *args])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code
        finally:
            for h in set(root.handlers) - set(handlers):
                root.removeHandler(h)
                h.close()
            root.setLevel(level)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def test_cli_run_writes_checkpoints_tensorboard_and_learns(corpus, tiny_overrides, run_app, tmp_path):
    """The Hydra app as a user runs it: the run directory from hydra.run.dir, a progress bar."""
    run_dir = tmp_path / "run"
    args = [a for a in tiny_overrides(corpus, run_dir) if not a.startswith(("run_dir", "train.progress"))]
    code, out, err = run_app(*args, f"hydra.run.dir={run_dir}")
    assert code == 0, err[-3000:]
    assert "tok_s=" in err and "12/12" in err  # the progress bar: tokens/s, steps
    assert "bits/char" in out and "--- sample ---" in out

    assert [s for s, _ in CheckpointManager(run_dir / "checkpoints").checkpoints()] == [6, 12]
    ck = load_checkpoint(run_dir / "checkpoints" / "ckpt-00000012.pt")
    assert ck["step"] == 12 and ck["stepper"]["hybrid_state"] is not None  # TBPTT state is saved
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "config"} <= set(ck)

    saved = (run_dir / "config.yaml").read_text()
    assert "vocab_size: 256" in saved and "${" not in saved  # resolved, with the tokenizer's vocabulary
    report = (run_dir / "precision_report.md").read_text()
    assert "| blocks.0.ffn.up |" in report and "# memory per parameter" in report

    tags = _scalars(run_dir)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/loss_scale", "val/loss", "val/bpc"):
        assert tag in tags, sorted(tags)[:20]
    assert [s for s, _ in tags["val/bpc"]] == [6, 12]
    assert "amax/blocks.0.ffn.up/input" in tags and "nonfinite/head/grad" in tags  # per-layer telemetry
    assert [s for s, _ in tags["amax/head/weight"]] == [4, 8, 12]

    summary = json.loads((run_dir / "summary.json").read_text())
    # an untrained byte model scores ~8 bits/char (uniform over 256 bytes); 12 steps must beat that
    first_bpc = tags["val/bpc"][0][1]
    assert summary["val_bpc"] < 7.0 and summary["val_bpc"] < first_bpc
    # rel 1e-6: TensorBoard stores the scalar as float32
    assert math.isclose(summary["val_bpc"], tags["val/bpc"][-1][1], rel_tol=1e-6)
    # the validation curve in the summary is the TensorBoard one (what experiments.ablate plots)
    assert summary["curve"]["step"] == [6, 12] and summary["curve"]["tokens"] == [6 * 2 * 4 * 16, 12 * 2 * 4 * 16]
    assert summary["curve"]["val_bpc"][-1] == summary["val_bpc"]
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, (_, b) in zip(summary["curve"]["val_loss"], tags["val/loss"]))
    assert len(summary["sample"]) > len("ROMEO:\n")


# ---------------------------------------------------------------------------------- resume

def _params(model_sd: dict) -> dict[str, torch.Tensor]:
    """Every tensor of a model state dict: float weights, and the packed codes of native layers."""
    return {k: v for k, v in model_sd.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("recipe", [(), ("precision=ternary_native", "optim=ternary_native")],
                         ids=["paper-latent", "ternary-native"])
def test_resume_gives_the_identical_next_steps(cfg, tmp_path, recipe):
    """6 steps in one go vs. 3 steps + resume from that run's step-3 checkpoint + 3 steps: the
    parameters (packed native buffers included), optimizer state and per-step losses are
    bit-identical (dropout on, TBPTT state carried, dynamic loss scaling for the paper policy's
    fp16 RNN, telemetry on some steps: every piece of state matters)."""
    extra = ("model.dropout=0.1", "train.steps=6", "train.ckpt_every=3", "train.eval_every=3",
             "train.telemetry_every=2", "train.sample_tokens=0", *recipe)
    a = tmp_path / "a"
    train(cfg(a, *extra))
    b = tmp_path / "b"
    train(cfg(b, *extra, f"resume={a / 'checkpoints' / 'ckpt-00000003.pt'}"))

    ck_a = load_checkpoint(a / "checkpoints" / "ckpt-00000006.pt")
    ck_b = load_checkpoint(b / "checkpoints" / "ckpt-00000006.pt")
    pa, pb = _params(ck_a["model"]), _params(ck_b["model"])
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    assert ck_a["scaler"] == ck_b["scaler"] and ck_a["stepper"]["source"] == ck_b["stepper"]["source"]
    for k, v in ck_a["stepper"]["hybrid_state"].items():
        assert (torch.equal(v, ck_b["stepper"]["hybrid_state"][k]) if isinstance(v, torch.Tensor)
                else v == ck_b["stepper"]["hybrid_state"][k]), k
    la, lb = _scalars(a)["train/loss"], _scalars(b)["train/loss"]
    assert [s for s, _ in lb] == list(range(4, 7))
    assert dict(la)[4] == dict(lb)[4] and la[3:] == lb  # the identical next step, and every one after
    # the moved-on run trained: a different model from the step-3 one
    p3 = _params(load_checkpoint(a / "checkpoints" / "ckpt-00000003.pt")["model"])
    assert any(not torch.equal(p3[k], pa[k]) for k in pa)


def test_resume_auto_skips_a_corrupt_newest_checkpoint(cfg, trained_run, copy_run, caplog):
    run = copy_run(trained_run(*RUN6))
    newest = run / "checkpoints" / "ckpt-00000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a full disk
    summary = train(cfg(run, *RUN6, "resume=auto"))
    assert str(newest) in caplog.text and "falling back" in caplog.text
    assert summary["steps"] == 6  # steps 4..6 trained again from ckpt-3, and a good ckpt-6 written
    assert load_checkpoint(newest)["step"] == 6


def test_corrupt_checkpoint_named_when_resumed_explicitly(cfg, tmp_path):
    bad = tmp_path / "ckpt-00000003.pt"
    bad.write_bytes(b"\x00" * 4096)
    with pytest.raises(CorruptCheckpointError, match="ckpt-00000003.pt"):
        train(cfg(tmp_path / "run", f"resume={bad}"))


def test_fresh_start_refused_over_existing_checkpoints_and_mismatch_named(cfg, trained_run):
    run = trained_run(*RUN6)  # both are refused before anything is written
    with pytest.raises(ConfigError, match="resume=auto"):
        train(cfg(run, "resume=null"))
    with pytest.raises(ConfigError, match=r"ckpt-00000006.pt' was written by a run whose model, train.batch_size differ"):
        train(cfg(run, "model.d_ff=64", "train.batch_size=2"))


def test_device_auto_and_threads(monkeypatch):
    from experiments import build
    from experiments.build import resolve_device, resolve_threads

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="train.device='cuda' but no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="train.device='gpu0' is not a device"):
        resolve_device("gpu0")
    torch.set_num_threads(2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(build, "busy_cores", lambda: 1.0)  # another process holds a core
    assert resolve_threads("auto") == 1
    monkeypatch.setattr(build, "busy_cores", lambda: 0.2)  # quiet machine
    assert resolve_threads("auto") == 2
    monkeypatch.setattr(build, "busy_cores", lambda: None)  # nothing to measure: torch's default
    assert resolve_threads("auto") == 2
    assert resolve_threads(None) == 2 and resolve_threads(3) == 3


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="busy_cores reads Linux's /proc/stat")
def test_busy_cores_sees_a_process_spinning_now():
    """A process that spins on one core shows as (at least most of) a busy core at once, where the
    1-minute load average would still say the machine is idle."""
    from experiments.build import busy_cores

    before = busy_cores(0.5)
    if before > (os.cpu_count() or 1) - 1.3:
        pytest.skip(f"{before:.1f} cores already busy: no free core to see a spinning process on")
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # started and spinning
        # one more core's worth, less 0.4 for the other processes' load changing between the samples
        assert busy_cores(0.5) - before >= 0.6
    finally:
        spin.kill()
        spin.wait()


# -------------------------------------------------------------------------------------- NaN

def test_nan_stops_after_k_bad_steps_naming_the_layer(cfg, tmp_path):
    run = tmp_path / "run"
    cfg = cfg(run, "train.ckpt_every=2", "train.max_bad_steps=3", "train.debug.nan_at_step=5",
               "train.debug.nan_layer=blocks.1.ffn.up", "train.telemetry_every=0")
    with pytest.raises(NonFiniteError) as err:
        train(cfg)
    msg = str(err.value)
    assert "stopped at step 7" in msg and "3 consecutive steps" in msg
    assert "first non-finite values in layer 'blocks.1.ffn.up' (weight)" in msg
    assert "blocks.1.ffn.up.weight" in msg and "ckpt-00000004.pt" in msg
    mgr = CheckpointManager(run / "checkpoints")
    assert [s for s, _ in mgr.checkpoints()] == [2, 4]  # no checkpoint of a bad step
    _, good = mgr.latest_valid()
    assert all(torch.isfinite(v).all() for v in _params(good["model"]).values() if v.is_floating_point())


# -------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("overrides, pattern", [
    (["model.rnn_mode=foo"], r"model: HybridConfig: unknown rnn_mode 'foo'; choose one of stream, chunked"),
    (["precision.default.weight=fp9"], r"precision: .*'fp9'.*fp8_e4m3"),
    (["data.path=/nope/missing"], r"data: data path '/nope/missing' does not exist"),
    (["train.batch_size=0"], r"train.batch_size=0 is invalid; it must be >= 1"),
    (["train.seq_len=64"], r"train.seq_len=64 exceeds model.window=16"),
    (["optim.schedule.warmup_steps=-5"], r"optim.schedule: warmup_steps=-5 is invalid"),
    (["train.loss_scale.mode=huge"], r"train.loss_scale.mode='huge' is unknown; choose one of"),
    (["optim.native.binary=adamw"], r"optim: native.binary='adamw'"),
    (["train.threads=many"], r"train.threads='many' is invalid; give an int >= 1, auto or null"),
    (["parallel.param_dtype=fp9"], r"parallel: parallel.param_dtype='fp9'; choose null or one of fp32, bf16, fp16"),
])
def test_bad_config_fails_before_anything_is_written(cfg, tmp_path, overrides, pattern):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=pattern):
        train(cfg(run, *overrides))
    assert not run.exists()


def test_one_process_computes_in_param_dtype(cfg, tmp_path, caplog):
    """parallel.param_dtype=bf16 on one process: the run says so, trains (finite losses) and saves
    fp32 masters; the checkpoint evaluates in bf16 too."""
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        train(cfg(run, "parallel.param_dtype=bf16", "train.steps=2", "train.ckpt_every=2", "train.sample_tokens=0"))
    assert "parameters computed in bf16 (parallel.param_dtype; fp32 masters)" in caplog.text
    _, ckpt = CheckpointManager(run / "checkpoints").latest_valid()
    params = _params(ckpt["model"])
    assert params and {v.dtype for v in params.values() if v.is_floating_point()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in params.values() if v.is_floating_point())
    from experiments.evaluate import load_run

    model, _, _ = load_run(run)  # evaluation computes as the run did
    assert model(torch.zeros(1, 4, dtype=torch.long))[0].dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("texts, pattern", [
    ({"a.txt": "", "b.txt": ""}, "holds no text"),
    ({"a.txt": "To be.\n", "b.txt": "Or not.\n"}, "needs at least"),
])
def test_empty_or_tiny_corpus(cfg_of, tmp_path, texts, pattern):
    d = tmp_path / "corpus"
    d.mkdir()
    for name, text in texts.items():
        (d / name).write_text(text)
    with pytest.raises(ConfigError, match=pattern):
        train(cfg_of(d, tmp_path / "run"))


def test_cli_bad_input_is_one_clear_line(run_app, tmp_path):
    code, _, err = run_app("model=tiny", "model.rnn_mode=foo", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2
    assert "error: model: HybridConfig: unknown rnn_mode 'foo'; choose one of stream, chunked" in err
    assert "Traceback" not in err
    code, _, err = run_app("model=huge", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 1
    assert "Could not find 'model/huge'" in err and "small" in err and "tiny" in err


def test_resume_a_checkpoint_written_before_train_task_existed(cfg, trained_run, copy_run, tmp_path):
    """A checkpoint whose saved config has no train.task / train.task_loss ran the corpus (lm, all):
    it resumes; one saved with another task is refused."""
    run = copy_run(trained_run(*RUN6))
    path = CheckpointManager(run / "checkpoints").checkpoints()[-1][1]
    payload = load_checkpoint(path)
    old = OmegaConf.create(payload["config"])
    del old.train["task"], old.train["task_loss"]
    save_checkpoint(path, dict(payload, config=OmegaConf.to_yaml(old)))
    assert train(cfg(run, "train.steps=8", "train.sample_tokens=0"))["steps"] == 8
    other = OmegaConf.create(payload["config"])
    other.train.task_loss = "answer"
    save_checkpoint(path, dict(payload, config=OmegaConf.to_yaml(other)))
    with pytest.raises(ConfigError, match="train.task_loss"):
        train(cfg(tmp_path / "run2", f"resume={path}", "train.steps=8", "train.sample_tokens=0"))


# --------------------------------------------------------------------------------- init_from

def test_init_from_starts_a_fresh_run_from_the_weights(cfg, trained_run, tmp_path):
    """init_from loads the model weights only: with lr=0 the new run's weights stay exactly the
    source's (so they were loaded, all of them), and it counts its own steps from 1."""
    a = trained_run(*RUN6)
    b = tmp_path / "b"
    summary = train(cfg(b, "train.steps=2", "optim.schedule.warmup_steps=0", "train.sample_tokens=0",
                         "train.ckpt_every=2", "optim.lr=0.0", "optim.weight_decay=0.0", f"init_from={a}"))
    assert summary["steps"] == 2
    pa = _params(load_checkpoint(a / "checkpoints" / "ckpt-00000006.pt")["model"])
    pb = _params(load_checkpoint(b / "checkpoints" / "ckpt-00000002.pt")["model"])
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    # a fresh start from the same seed differs from the source: the weights came from init_from
    c = tmp_path / "c"
    train(cfg(c, "train.steps=2", "optim.schedule.warmup_steps=0", "train.sample_tokens=0", "train.ckpt_every=2",
               "optim.lr=0.0", "optim.weight_decay=0.0"))
    pc = _params(load_checkpoint(c / "checkpoints" / "ckpt-00000002.pt")["model"])
    assert any(not torch.equal(pa[k], pc[k]) for k in pa)


def test_init_from_refuses_another_model_or_a_missing_path(cfg, trained_run, tmp_path):
    a = trained_run(*RUN6)
    with pytest.raises(ConfigError, match=r"init_from=.*does not fit this model \(shape differs \['blocks.0.ffn"):
        train(cfg(tmp_path / "b", "model.d_ff=64", f"init_from={a}"))
    with pytest.raises(ConfigError, match=r"init_from: checkpoint .*nowhere.* does not exist"):
        train(cfg(tmp_path / "c", f"init_from={tmp_path / 'nowhere'}"))
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()  # refused before writing


def test_ctrl_c_saves_a_checkpoint_and_prints_the_command_that_resumes(corpus, tiny_overrides, run_app, tmp_path,
                                                                       monkeypatch):
    """Ctrl-C (SIGINT) during step 4 of 6: step 4 completes and is saved, the app exits 130 with the
    command that continues the run in place, and that command finishes the run from step 5."""
    import experiments.loop

    real_step, calls = experiments.loop.Stepper.step, {"n": 0}

    def step(self):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self)

    monkeypatch.setattr(experiments.loop.Stepper, "step", step)
    run_dir = tmp_path / "run"
    args = [*tiny_overrides(corpus, run_dir), "train.steps=6", "train.ckpt_every=100", "train.sample_tokens=0"]
    code, _, err = run_app(*[a for a in args if not a.startswith("run_dir=")], f"hydra.run.dir={run_dir}")
    assert code == 130 and calls["n"] == 4
    assert [p.name for p in (run_dir / "checkpoints").glob("ckpt-*.pt")] == ["ckpt-00000004.pt"]
    assert load_checkpoint(run_dir / "checkpoints" / "ckpt-00000004.pt")["step"] == 4
    command = err.split("to continue this run:\n")[1].strip().splitlines()[0]
    assert command.startswith("python -m experiments.train ") and command.endswith(f"hydra.run.dir={run_dir} resume=auto")
    monkeypatch.setattr(experiments.loop.Stepper, "step", real_step)
    code, out, _ = run_app(*command.split()[3:])
    assert code == 0 and "after 6 steps" in out and calls["n"] == 4
