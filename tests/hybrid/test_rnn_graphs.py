"""The LSTM's step loops replayed as CUDA graphs compute what the loops compute step by step."""
import copy
import pickle
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from hybrid import HybridConfig, HybridLM, preset
from hybrid.rnn import LSTMLayer
from lowprec import Telemetry, apply_policy
from lowprec.cuda_graphs import GraphCache
from lowprec.nn import QLinear
from lowprec.policy import PrecisionPolicy

PRECISION = Path(__file__).resolve().parents[2] / "configs" / "precision"


def test_a_copy_of_a_layer_gets_graphs_of_its_own():
    """Graphs hold the addresses of the layer they were captured for: a copy (deepcopy, pickle)
    starts with an empty cache of its own and keeps the switch."""
    layer = LSTMLayer(8, cuda_graphs=False)
    layer.graphs.captures = 3
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert isinstance(other.graphs, GraphCache) and other.graphs is not layer.graphs
        assert other.graphs.captures == 0 and other.cuda_graphs is False


def test_the_switch_is_checked():
    with pytest.raises(ValueError, match="rnn_cuda_graphs"):
        HybridConfig(rnn_cuda_graphs="yes")
    model = HybridLM(preset("tiny").replace(rnn_cuda_graphs=False))
    assert all(layer.cuda_graphs is False for layer in model.rnn.lstm)


def _layer(policy: str | None) -> LSTMLayer:
    torch.manual_seed(0)
    layer = LSTMLayer(64)
    if policy is not None:
        precision = PrecisionPolicy.from_config(OmegaConf.load(PRECISION / f"{policy}.yaml")).resolve("rnn.lstm.0.hh")
        layer.hh = QLinear.from_float(layer.hh, precision)
    return layer.cuda()


def _hh_grad(layer: LSTMLayer) -> torch.Tensor:
    hh = layer.hh
    return (hh.native_grad if getattr(hh, "is_native", False) else hh.weight.grad).clone()


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("policy", [None, "paper", "fp8", "ternary_native"])
def test_graphed_recurrence_equals_step_by_step(policy, compiled):
    """One layer called 5 times on new inputs (new valid masks too), each call once with its graphs
    and once without (``cuda_graphs`` switched, which the operators read when they run, so both
    use the same compiled code: two compilations could autotune their kernels differently), the
    recurrent weight changed in place between calls: outputs, input and state gradients and the
    weight gradient are bit-identical (a replay launches the kernels the loop launches, on the same
    operands), in eager mode and through the compiled operators. The first call of a signature runs
    step by step, the second captures, the rest replay."""
    layer = _layer(policy)
    if compiled:
        torch._dynamo.reset()
    fn = torch.compile(layer, fullgraph=True) if compiled else layer
    gen = torch.Generator(device="cuda").manual_seed(1)
    for call in range(5):
        x = torch.randn(3, 6, 64, device="cuda", generator=gen).requires_grad_()
        h0 = torch.randn(3, 64, device="cuda", generator=gen).requires_grad_()
        c0 = torch.randn(3, 64, device="cuda", generator=gen)
        valid = torch.arange(6, device="cuda") < 3 + call % 3
        results = []
        for graphs in (True, False):
            layer.cuda_graphs = graphs
            y, h, c = fn(x, h0, c0, valid)
            (y.square().sum() + h.sum() + c.sum()).backward()
            results.append([y, h, c, x.grad, h0.grad, _hh_grad(layer)])
            x.grad = h0.grad = None
            layer.zero_grad(set_to_none=True)
            if getattr(layer.hh, "is_native", False):
                layer.hh.zero_native_grad()
        names = ("y", "h", "c", "x.grad", "h0.grad", "hh grad")
        for name, a, b in zip(names, *results, strict=True):
            assert torch.equal(a, b), f"call {call}: {name} differs by up to {float((a - b).abs().max()):.3g}"
        with torch.no_grad():  # an optimizer's in-place update: the graphs must read the new values
            hh = layer.hh
            (hh.w_scale if getattr(hh, "is_native", False) else hh.weight).mul_(1.0 + 0.05 * (call + 1))
    counts = (layer.graphs.captures, layer.graphs.replays, layer.graphs.moves)
    assert counts == (2, 2 * 4, 0), f"captures, replays, moves: {counts}"  # forward and backward
    if policy is not None:  # telemetry records at every step: the loops then run step by step
        layer.cuda_graphs = True
        tel = Telemetry(layer)
        tel.enable()
        y, h, c = fn(x, h0, c0, valid)
        (y.sum() + h.sum()).backward()
        assert layer.graphs.replays == 2 * 4 and ("hh", "grad") in tel.stats()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["stream", "chunked"])
def test_graphed_training_follows_step_by_step_training(mode):
    """The tiny hybrid under the paper policy, 5 truncated-BPTT steps with carried state and AdamW
    updates, once with graphs and once without: the same losses and weights, bit for bit."""
    runs = []
    for graphs in (True, False):
        torch.manual_seed(0)
        model = HybridLM(preset("tiny").replace(rnn_mode=mode, rnn_cuda_graphs=graphs))
        apply_policy(model, OmegaConf.load(PRECISION / "paper.yaml"))
        model.cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gen = torch.Generator(device="cuda").manual_seed(2)
        state, losses = None, []
        for _ in range(5):
            x = torch.randint(0, model.cfg.vocab_size, (2, model.cfg.window + 1), device="cuda", generator=gen)
            logits, state = model(x[:, :-1], state)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            state = state.detach()
            losses.append(loss.detach())
        replays = sum(layer.graphs.replays for layer in model.rnn.lstm)
        runs.append((torch.stack(losses), [p.detach().clone() for p in model.parameters()], replays))
    (loss_g, params_g, replays_g), (loss_p, params_p, replays_p) = runs
    assert replays_g > 0 and replays_p == 0
    assert torch.equal(loss_g, loss_p)
    assert all(torch.equal(a, b) for a, b in zip(params_g, params_p, strict=True))


@pytest.mark.gpu
def test_graph_cache_reads_weights_in_place_and_copies_them_in_when_they_move():
    """GraphCache on a small function: the second call captures, later ones replay; a replay reads
    the fixed input as it is now and returns outputs of its own (a later replay does not overwrite
    them); once a fixed input has moved twice, the graph copies it in at every call (weights at new
    addresses and with new values each call, as a sharded model's gathered weights, give what the
    plain call gives, bit for bit); inputs over max_bytes never capture."""
    cache = GraphCache(max_bytes=1 << 20)
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(64, 64, device="cuda", generator=gen)

    def fn(x, w):
        return (x @ w).relu(), [x.sum()]

    outs = []
    for _ in range(4):
        x = torch.randn(8, 64, device="cuda", generator=gen)
        got = cache(fn, (x,), (w,), "k")
        want = fn(x, w)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1][0], want[1][0])
        outs.append((got[0], want[0]))
        w.mul_(1.5)  # in place: the next replay must read it
    assert cache.captures == 1 and cache.replays == 3
    assert all(torch.equal(a, b) for a, b in outs)  # earlier outputs were not overwritten
    for _ in range(2):
        w = w.clone()  # moved
        x = torch.randn(8, 64, device="cuda", generator=gen)
        assert torch.equal(cache(fn, (x,), (w,), "k")[0], fn(x, w)[0])
    assert cache.moves == 2
    for i in range(4):  # a new address and new values at every call (the call that moved it ran plainly)
        w = torch.randn(64, 64, device="cuda", generator=gen)
        assert torch.equal(cache(fn, (x,), (w,), "k")[0], fn(x, w)[0]), i
    assert cache.captures == 2 and cache.replays == 3 + 4
    wt = torch.randn(64, 64, device="cuda", generator=gen).t()  # a transposed weight keeps its strides
    for _ in range(3):
        wt = wt.clone().mul_(0.5).t().contiguous().t()
        assert torch.equal(cache(fn, (x,), (wt,), "k")[0], fn(x, wt)[0])
    assert cache.captures == 3
    with torch.inference_mode():  # its own graph: buffers made here could not be written outside
        fresh = GraphCache()
        for _ in range(3):
            assert torch.equal(fresh(fn, (x,), (w,), "k")[0], fn(x, w)[0])
    for _ in range(2):  # the same signature outside inference mode: a graph of its own
        assert torch.equal(fresh(fn, (x,), (w,), "k")[0], fn(x, w)[0])
    assert fresh.captures == 2 and fresh.replays == 3
    big = torch.randn(4096, 64, device="cuda", generator=gen)  # 1 MiB
    small = GraphCache(max_bytes=(1 << 20) - 1)
    for _ in range(3):
        assert torch.equal(small(fn, (big,), (w,), "k")[0], fn(big, w)[0])
    assert small.captures == small.replays == 0


@pytest.mark.gpu
def test_wide_layers_run_step_by_step():
    """Beyond GRAPH_MAX_WIDTH a layer's loops are not captured (no graph, no buffers)."""
    from hybrid.rnn import GRAPH_MAX_WIDTH, LINEAR_GEMMS

    wide = LSTMLayer(8)
    wide.hh = torch.nn.Linear(GRAPH_MAX_WIDTH + 8, 4 * (GRAPH_MAX_WIDTH + 8), bias=False, device="meta")
    gx = torch.zeros(1, 1, 4, device="cuda")
    assert wide.graphs_for(gx, LINEAR_GEMMS) is None
    assert LSTMLayer(8).graphs_for(gx, LINEAR_GEMMS) is not None


def test_graph_cache_decides_when_to_capture(monkeypatch):
    """GraphCache's bookkeeping, on the CPU with the capture replaced by a recorder (the capture
    itself is the GPU tests' part): a signature runs plainly the first time, is captured the second
    and replayed after; shapes, the key and inference mode make other signatures; fixed inputs that
    move twice drop the graphs of their addresses and are copied in from then on; max_graphs and
    max_bytes bound it."""
    import lowprec.cuda_graphs as cg

    made = []

    class Recorded:
        def __init__(self, fn, copied, fixed, strided=0, keep_first=False):
            self.fn, self.fixed = fn, fixed
            made.append(self)

        def __call__(self, copied):
            return self.fn(*copied, *self.fixed)

    monkeypatch.setattr(cg, "_Graph", Recorded)

    def fn(x, w):
        return x @ w

    w, x = torch.randn(4, 4), torch.randn(2, 4)
    cache = GraphCache(max_graphs=3, max_bytes=1024)
    for _ in range(4):
        assert torch.equal(cache(fn, (x,), (w,), "a"), fn(x, w))
    assert (len(made), cache.captures, cache.replays) == (1, 1, 3)
    cache(fn, (torch.randn(3, 4),), (w,), "a")  # another shape: a signature of its own
    cache(fn, (x,), (w,), "b")  # another key
    with torch.inference_mode():
        cache(fn, (x,), (w,), "a")
    assert cache.captures == 1
    for _ in range(2):
        cache(fn, (torch.randn(3, 4),), (w,), "a")
        cache(fn, (x,), (w,), "b")
    assert cache.captures == 3  # max_graphs: no fourth
    with torch.inference_mode():
        cache(fn, (x,), (w,), "a")
    assert cache.captures == 3
    roomy = GraphCache(max_bytes=1024)
    big = torch.randn(65, 4)  # 1,040 bytes: over max_bytes
    for _ in range(3):
        roomy(fn, (big,), (w,), "a")
    assert roomy.captures == 0
    for _ in range(2):
        roomy(fn, (big[:64],), (w,), "a")  # 1,024 bytes: within
    assert roomy.captures == 1
    w2 = w.clone()
    cache(fn, (x,), (w2,), "a")  # moved once: a graph of its own later
    assert cache.moves == 1 and len(cache._graphs) == 3
    cache(fn, (x,), (w.clone(),), "a")  # moved again: the graphs of fixed addresses are dropped
    assert cache.moves == 2 and len(cache._graphs) == 0
    before = (cache.captures, cache.replays)
    for _ in range(4):  # the weights copied in from now on (the call that moved them ran plainly): captured, replayed
        w3 = torch.randn(4, 4)
        assert torch.equal(cache(fn, (x,), (w3,), "a"), fn(x, w3))
    assert (cache.captures, cache.replays) == (before[0] + 1, before[1] + 4)
    assert made[-1].fixed == ()  # the weight is among the copied inputs
    tight = GraphCache(max_bytes=2 * 4 * 4 + 64 - 1)  # x (32 bytes) + w (64): over by one once w is copied
    for _ in range(6):
        tight(fn, (x,), (torch.randn(4, 4),), "a")
    assert tight.moves >= 2 and tight.captures == 0
    cache.clear()
    cache(fn, (x,), (w2,), "a")
    cache(fn, (x,), (w2,), "a")
    assert cache.moves == 0 and cache.captures == 5
