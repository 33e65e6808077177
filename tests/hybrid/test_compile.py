"""`torch.compile` of a training step: one graph per shape class, never a recompile as the document
goes on, and the same numbers as eager.

A tiny hybrid under the paper's precision policy (FP8 attention/fusion/embeddings, FP4 FFN and
head, FP16 RNN) is compiled with `fullgraph=True` (a graph break is an error) and a backend that
counts its calls and hands the graph to `aot_eager` (AOTAutograd traces forward and backward,
then runs the same ATen ops eagerly: no code generation, so compiling is quick on a CPU and the
numbers can be compared exactly). It is trained for 7 truncated-BPTT steps of one 3-token segment
each, `state.detach()` between steps. With chunk 2 the chunks cut through the segments (a segment
completes 1 or 2 chunks, chunked mode carries 0 or 1 pending token), and with a bank of 3 the bank
fills in segment 2 and drops its oldest vectors from then on: ramp-up and wrap-around, and no
step has the position, the chunk count or the bank fill of the one before. Compilations: the
first segment (no state) and every later one (carried state).
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import hybrid.attention
from hybrid import HybridLM, preset
from lowprec import apply_policy
from lowprec.policy import PrecisionPolicy

PAPER = Path(__file__).resolve().parents[2] / "configs" / "precision" / "paper.yaml"
STEPS, B, T = 7, 2, 3


class CountingBackend:
    """A `torch.compile` backend that counts the graphs it is given and compiles them with `inner`
    (`aot_eager` unless told)."""

    def __init__(self, inner: str = "aot_eager"):
        self.graphs, self.inner = 0, inner

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend(self.inner)(gm, example_inputs)


def train_steps(model, tokens, T):
    """STEPS truncated-BPTT steps of T tokens; per step (loss, {name: grad}), and the last state."""
    out, state = [], None
    for s in range(0, STEPS * T, T):
        state = None if state is None else state.detach()
        logits, state = model(tokens[:, s:s + T], state)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, s + 1:s + T + 1].flatten())
        params = dict(getattr(model, "_orig_mod", model).named_parameters())
        grads = torch.autograd.grad(loss, list(params.values()))
        out.append((loss.detach(), dict(zip(params, grads))))
    return out, state


def compiled_and_eager(cfg, backend):
    """The tiny hybrid ``cfg`` under the paper policy, trained STEPS steps compiled (fullgraph, with
    ``backend``) and eager from the same weights: (compiled results, state, eager results, state)."""
    torch.manual_seed(0)
    model = HybridLM(cfg)
    apply_policy(model, PrecisionPolicy.from_config(OmegaConf.load(PAPER)))
    tokens = torch.randint(0, cfg.vocab_size, (B, STEPS * T + 1))
    torch._dynamo.reset()
    got, got_state = train_steps(torch.compile(model, backend=backend, fullgraph=True), tokens, T)
    ref, ref_state = train_steps(model, tokens, T)
    torch._dynamo.reset()
    return got, got_state, ref, ref_state


@pytest.fixture(scope="module", params=["stream", "chunked"])
def runs(request):
    cfg = preset("tiny").replace(rnn_mode=request.param, window=4, chunk=2, max_memory=3,
                                 n_blocks=1, rnn_layers=1)
    backend = CountingBackend()
    got, got_state, ref, ref_state = compiled_and_eager(cfg, backend)
    return cfg, backend.graphs, got, got_state, ref, ref_state


def test_compiled_once_per_shape_class(runs):
    """fullgraph=True: no graph break in forward or backward, with and without a carried state;
    2 compilations over 7 steps whatever the position: none state and carried state."""
    cfg, graphs, _, state, _, _ = runs
    assert graphs == 2
    assert int(state.pos) == STEPS * T
    assert state.memory_len(cfg.chunk, cfg.max_memory) == cfg.max_memory  # the bank filled and wrapped


def test_compiled_step_equals_eager(runs):
    """aot_eager runs the ATen ops eager runs, in the same order (its graph is the traced eager
    program, not a fused kernel), so losses, every parameter's gradient and the carried state
    are bit-identical."""
    _, _, got, got_state, ref, ref_state = runs
    for (loss, grads), (ref_loss, ref_grads) in zip(got, ref, strict=True):
        assert torch.equal(loss, ref_loss)
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            assert torch.equal(g, ref_grads[name]), name
    for k, v in got_state.state_dict().items():
        assert (v is None and ref_state.state_dict()[k] is None) or torch.equal(v, ref_state.state_dict()[k]), k


def _layer_compiled_and_eager(layer, grads) -> tuple[int, list[list]]:
    """(graphs compiled, [compiled results, eager results]) of one LSTM layer on the same inputs:
    its outputs and ``grads(loss, x, h0)``."""
    d = layer.norm.normalized_shape[0]
    x = torch.randn(2, 5, d, requires_grad=True)
    h0, c0 = torch.randn(2, d, requires_grad=True), torch.randn(2, d)
    valid = torch.arange(5) < 3
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    results = []
    for fn in (compiled, layer):
        y, h, c = fn(x, h0, c0, valid)
        results.append([y, h, c, *grads(y.square().sum() + h.sum() + c.sum(), x, h0)])
    torch._dynamo.reset()
    return backend.graphs, results


def test_lstm_recurrence_compiles_into_the_graph():
    """With a plain `hh` (no policy) the recurrence is one autograd.Function with a hand-written
    backward: it traces into one graph too, and gives eager's numbers exactly (aot_eager, as above)."""
    from hybrid.rnn import LSTMLayer

    torch.manual_seed(0)
    layer = LSTMLayer(8)
    graphs, results = _layer_compiled_and_eager(
        layer, lambda loss, x, h0: torch.autograd.grad(loss, [x, h0, *layer.parameters()]))
    assert graphs == 1
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("policy", ["fp8", "paper", "ternary_native"])
def test_quantized_lstm_recurrence_compiles_into_the_graph(policy):
    """With a policy's `hh` (QLinear: latent FP8 and FP16, native ternary) the recurrence runs
    through `QLinear.recurrent_gemms`: one graph as well, and eager's numbers exactly, the weight
    gradient (the native one through its carrier) included."""
    from hybrid.rnn import LSTMLayer
    from lowprec.nn import QLinear

    torch.manual_seed(0)
    layer = LSTMLayer(16)
    precision = PrecisionPolicy.from_config(OmegaConf.load(PAPER.parent / f"{policy}.yaml")).resolve("rnn.lstm.0.hh")
    layer.hh = QLinear.from_float(layer.hh, precision)

    def grads(loss, x, h0):
        loss.backward()
        hh_grad = layer.hh.native_grad if layer.hh.is_native else layer.hh.weight.grad
        out = [x.grad, h0.grad, hh_grad]
        x.grad = h0.grad = None
        layer.zero_grad(set_to_none=True)
        if layer.hh.is_native:
            layer.hh.zero_native_grad()
        return out

    graphs, results = _layer_compiled_and_eager(layer, grads)
    assert graphs == 1
    for a, b in zip(*results, strict=True):
        assert a is not None and torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", [None, "paper", "ternary_native"])
def test_compiled_recurrence_on_cuda_is_close_to_eager(policy):
    """On CUDA the compiled recurrence's operators run each step's pointwise work as one fused
    kernel (inductor's), whose sigmoid/tanh/products round differently from ATen's kernels by a
    few ulp in fp32; over 5 steps, forward and backward, outputs and gradients stay within
    rtol 1e-4 / atol 1e-5 of eager (the GEMMs and their quantization are the same calls). One
    graph, no graph break."""
    from hybrid.rnn import LSTMLayer
    from lowprec.nn import QLinear

    torch.manual_seed(0)
    layer = LSTMLayer(64)
    if policy is not None:
        precision = PrecisionPolicy.from_config(OmegaConf.load(PAPER.parent / f"{policy}.yaml")).resolve("rnn.lstm.0.hh")
        layer.hh = QLinear.from_float(layer.hh, precision)
    layer.cuda()
    torch._dynamo.reset()
    backend = CountingBackend("inductor")
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    x = torch.randn(3, 5, 64, device="cuda", requires_grad=True)
    h0, c0 = torch.randn(3, 64, device="cuda", requires_grad=True), torch.randn(3, 64, device="cuda")
    valid = torch.arange(5, device="cuda") < 4
    results = []
    for fn in (compiled, layer):
        y, h, c = fn(x, h0, c0, valid)
        (y.square().sum() + h.sum() + c.sum()).backward()
        hh_grad = layer.hh.native_grad if getattr(layer.hh, "is_native", False) else layer.hh.weight.grad
        results.append([y, h, c, x.grad, h0.grad, hh_grad.clone()])
        x.grad = h0.grad = None
        layer.zero_grad(set_to_none=True)
        if getattr(layer.hh, "is_native", False):
            layer.hh.zero_native_grad()
    assert backend.graphs == 1
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class GraphKeeper(CountingBackend):
    """A `CountingBackend` that also keeps the graphs."""

    def __init__(self):
        super().__init__()
        self.gms = []

    def __call__(self, gm, example_inputs):
        self.gms.append(gm)
        return super().__call__(gm, example_inputs)


def test_blocks_compile_once():
    """`compile_blocks_once`: the graph calls one traced block (a nested compile region) once per
    block, with no graph break and no recompilation across TBPTT steps, and computes, under the
    paper policy, exactly what the model computes eagerly (aot_eager: the same ATen ops)."""
    with pytest.raises(ValueError, match="compile_blocks_once"):
        preset("tiny").replace(compile_blocks_once="yes")
    if hybrid.attention._block_once is None:  # an older torch: refused with the reason
        with pytest.raises(RuntimeError, match="needs torch >= 2.13"):
            HybridLM(preset("tiny").replace(compile_blocks_once=True))
        pytest.skip(f"torch {torch.__version__}: compile_blocks_once needs 2.13 (the refusal is checked)")
    cfg = preset("tiny").replace(rnn_mode="chunked", window=4, chunk=2, max_memory=3, n_blocks=3, rnn_layers=1,
                                 compile_blocks_once=True)
    backend = GraphKeeper()
    got, _, ref, _ = compiled_and_eager(cfg, backend)
    assert backend.graphs == 2   # the first segment (no state) and the carried state, as without regions
    for gm in backend.gms:
        calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.higher_order.invoke_subgraph]
        assert len(calls) == cfg.n_blocks
        assert len({n.args[0].target for n in calls}) == 1   # one traced block, called by each
    for (loss, grads), (ref_loss, ref_grads) in zip(got, ref, strict=True):
        assert torch.equal(loss, ref_loss)
        for name, g in grads.items():
            assert torch.equal(g, ref_grads[name]), name


def test_delayed_scaling_compiles_and_equals_eager():
    """The windowed tiny model under fp8_delayed (every linear layer's input, weight and gradient
    scaled from an amax history updated in place each step): compiled with fullgraph=True, 4 steps
    give the same losses, gradients and histories as an eager copy, bit for bit (aot_eager runs the
    same ATen ops), in 2 compilations (no state, carried state)."""
    import copy

    cfg = preset("tiny").replace(memory=False, n_blocks=1, window=4)
    torch.manual_seed(0)
    model = HybridLM(cfg)
    policy = Path(__file__).resolve().parents[2] / "configs" / "precision" / "fp8_delayed.yaml"
    apply_policy(model, PrecisionPolicy.from_config(OmegaConf.load(policy)))
    twin = copy.deepcopy(model)
    tokens = torch.randint(0, cfg.vocab_size, (B, STEPS * T + 1))
    torch._dynamo.reset()
    backend = CountingBackend()
    got, _ = train_steps(torch.compile(model, backend=backend, fullgraph=True), tokens, T)
    ref, _ = train_steps(twin, tokens, T)
    torch._dynamo.reset()
    assert backend.graphs == 2
    for (loss, grads), (ref_loss, ref_grads) in zip(got, ref, strict=True):
        assert torch.equal(loss, ref_loss)
        assert all(torch.equal(g, ref_grads[name]) for name, g in grads.items())
    histories = {k: v for k, v in model.named_buffers() if "amax_history" in k}
    assert histories and any(bool((h[:STEPS] > 0).all()) for h in histories.values())  # one amax a step, newest first
    assert all(torch.equal(v, dict(twin.named_buffers())[k]) for k, v in histories.items())


@pytest.mark.gpu
@pytest.mark.parametrize("rnn_mode", ["chunked", "stream"])
@pytest.mark.parametrize("policy", ["bf16", "paper"])
def test_hybrid_step_as_cuda_graphs(policy, rnn_mode):
    """`torch.compile(mode="reduce-overhead")`: the tiny hybrid's whole training step (the LSTM
    operators inside) is captured as CUDA graphs and replayed. Over 5 steps of AdamW its losses
    equal those of the same step compiled without graphs (the same kernels, replayed: rtol 1e-5),
    and its first loss, before any update, the eager model's within rtol 1e-4 (fp32; inductor's
    fused kernels round sigmoid/tanh/sums differently from ATen's by a few ulp)."""
    import copy

    cfg = preset("tiny").replace(rnn_mode=rnn_mode, window=8, chunk=4, n_blocks=2, rnn_layers=2)
    torch.manual_seed(0)
    model = HybridLM(cfg)
    apply_policy(model, PrecisionPolicy.from_config(OmegaConf.load(PAPER.parent / f"{policy}.yaml")))
    model.cuda()
    tokens = torch.randint(0, cfg.vocab_size, (4, 9), device="cuda")
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    losses = {}
    for compile_mode in ("reduce-overhead", "default", "eager"):
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)

        def loss_fn(x, y, m=m):
            return F.cross_entropy(m(x)[0].float().flatten(0, 1), y.flatten())
        torch._dynamo.reset()
        fn = loss_fn if compile_mode == "eager" else torch.compile(loss_fn, mode=compile_mode)
        run = []
        for _ in range(5):
            loss = fn(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            run.append(loss.detach().clone())
        losses[compile_mode] = torch.stack(run)
    torch._dynamo.reset()
    got = losses["reduce-overhead"]
    assert torch.isfinite(got).all(), losses
    torch.testing.assert_close(got, losses["default"], rtol=1e-5, atol=0, msg=lambda m: f"{m}\n{losses}")
    torch.testing.assert_close(got[0], losses["eager"][0], rtol=1e-4, atol=0, msg=lambda m: f"{m}\n{losses}")


@pytest.mark.parametrize("rnn_mode", ["chunked", "stream"])
def test_int8_plans_trace_whole_and_equal_eager(monkeypatch, rnn_mode):
    """Opted into int8 GEMMs (``lowprec.kernels.AUTO_ORDER_INT8``; on the CPU ``torch._int_mm``), the
    tiny hybrid under BitNet's policy (int8 x ternary fprop in the blocks and the LSTM's recurrent
    layer) traces as one graph per shape class (fullgraph) over TBPTT steps with a carried state,
    and aot_eager's losses, gradients and state equal eager's bit for bit."""
    from lowprec import kernels

    monkeypatch.setattr(kernels, "AUTO_ORDER", kernels.AUTO_ORDER_INT8)
    cfg = preset("tiny").replace(rnn_mode=rnn_mode, window=4, chunk=2, max_memory=3, n_blocks=1, rnn_layers=1)
    torch.manual_seed(0)
    model = HybridLM(cfg)
    apply_policy(model, PrecisionPolicy.from_config(OmegaConf.load(PAPER.parent / "ternary.yaml")))
    kernels_of = {name: m.plan.fprop.kernel for name, m in model.named_modules() if hasattr(m, "plan")}
    assert kernels_of["rnn.lstm.0.hh"] == kernels_of["blocks.0.ffn.up"] == "int8_tensorcore", kernels_of
    tokens = torch.randint(0, cfg.vocab_size, (B, STEPS * T + 1))
    backend = CountingBackend()
    torch._dynamo.reset()
    got, got_state = train_steps(torch.compile(model, backend=backend, fullgraph=True), tokens, T)
    ref, ref_state = train_steps(model, tokens, T)
    torch._dynamo.reset()
    assert backend.graphs == 2  # state absent, state carried
    for (loss, grads), (ref_loss, ref_grads) in zip(got, ref, strict=True):
        assert torch.equal(loss, ref_loss)
        assert all(torch.equal(g, ref_grads[name]) for name, g in grads.items())
    for k, v in got_state.state_dict().items():
        assert (v is None and ref_state.state_dict()[k] is None) or torch.equal(v, ref_state.state_dict()[k]), k
