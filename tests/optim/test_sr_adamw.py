"""SRAdamW: torch's AdamW arithmetic, unbiased stochastic-rounding writes, learning in FP8/FP4/bf16."""

import math

import pytest
import torch
from torch import nn

import lowprec
import optim
from optim import moments

from . import conftest


def native_layer(fmt: str, out_f: int, in_f: int, weight: torch.Tensor | None = None, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_f, out_f, bias=False))
    if weight is not None:
        with torch.no_grad():
            model[0].weight.copy_(weight)
    lowprec.apply_policy(model, {"default": {"weight": fmt, "storage": "native"}})
    return model[0]


def test_fp32_parameter_with_fp32_moments_is_torch_adamw_bit_for_bit():
    torch.manual_seed(0)
    p_ref = nn.Parameter(torch.randn(7, 5))
    p_sr = nn.Parameter(p_ref.detach().clone())
    kw = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    ref, sr = torch.optim.AdamW([p_ref], foreach=False, **kw), optim.SRAdamW([p_sr], moment_dtype="fp32", **kw)
    for _ in range(5):
        g = torch.randn(7, 5)
        p_ref.grad, p_sr.grad = g.clone(), g.clone()
        ref.step()
        sr.step()
        assert torch.equal(p_ref, p_sr)
    assert torch.equal(ref.state[p_ref]["exp_avg_sq"], sr.state[p_sr]["exp_avg_sq"])


def fp32_first_step(w0: torch.Tensor, g: torch.Tensor, lr: float, eps: float = 1e-8) -> torch.Tensor:
    """AdamW's first step without weight decay: m_hat = g, v_hat = g^2."""
    return w0 - lr * g / (g.abs() + eps)


def grid_step(x: torch.Tensor, scale: torch.Tensor, man_bits: int, min_exp: int) -> torch.Tensor:
    """Spacing of a float grid (``man_bits`` mantissa bits, smallest normal exponent ``min_exp``)
    around ``x``, for elements scaled by ``scale``."""
    a = (x / scale).abs()
    e = torch.floor(torch.log2(a.clamp(min=1e-30))).clamp(min=min_exp)
    return scale * torch.exp2(e - man_bits)


def test_sr_write_of_a_native_fp8_weight_is_unbiased():
    """Columns of a (rows x 16) weight repeat one (w0, g) each: every row is an independent SR
    draw, so the column means over rows x seeds estimate E[w1]. Var of one SR draw <= q^2 / 4 (q
    the grid step), so the mean of K draws is within 5 q / (2 sqrt K) of the fp32 update except with
    probability < 6e-7 per column. The update (lr = 1e-3) is far below the grid step (q ~ 4e-3..1.6e-2
    here): rounding to nearest would never move the weight, SR must move it on average."""
    rows, seeds, lr = 512, 16, 1e-3
    w_col = torch.linspace(-0.5, 0.5, 16) + 0.013  # off-grid, none zero
    g_col = torch.where(torch.arange(16) % 2 == 0, 1.0, -1.0) * torch.linspace(0.1, 1.0, 16)
    w0 = lowprec.quantize_dequantize(w_col.expand(rows, 16), "fp8_e4m3")[0]  # start on the grid
    expected = fp32_first_step(w0[0], g_col, lr)
    total = torch.zeros(16)
    for seed in range(seeds):
        layer = native_layer("fp8_e4m3", rows, 16, w0)
        assert torch.equal(layer.native_weight.dequantize(), w0)
        layer.native_grad = g_col.expand(rows, 16).clone()
        optim.SRAdamW([layer], lr=lr, weight_decay=0.0, seed=seed).step()
        total += layer.native_weight.dequantize().sum(0)
    K = rows * seeds
    mean = total / K
    scale = (expected.abs().max() / 448.0)  # the absmax scale of the updated tensor
    q = grid_step(expected, scale, 3, -6)
    assert ((mean - expected).abs() <= 5 * q / (2 * math.sqrt(K))).all()
    assert ((mean - w0[0]).abs() > 5 * q / (2 * math.sqrt(K))).any()  # it did move, by ~lr


def test_sr_write_of_a_bf16_parameter_is_unbiased():
    """As above for a bf16 master weight (8 significant bits): the update 1e-4 is below half a bf16
    step of every column (|w| in [0.05, 0.25]: step >= 2.4e-4), so nearest rounding would lose it."""
    rows, lr = 8192, 1e-4
    w_col = torch.linspace(0.05, 0.25, 16).to(torch.bfloat16).float()
    g_col = torch.where(torch.arange(16) % 2 == 0, 1.0, -1.0)
    p = nn.Parameter(w_col.expand(rows, 16).to(torch.bfloat16).clone())
    p.grad = g_col.expand(rows, 16).to(torch.bfloat16).clone()
    optim.SRAdamW([p], lr=lr, weight_decay=0.0, seed=3).step()
    assert p.dtype == torch.bfloat16
    expected = fp32_first_step(w_col, g_col, lr)
    q = grid_step(expected, torch.tensor(1.0), 7, -126)
    mean = p.float().mean(0)
    assert ((mean - expected).abs() <= 5 * q / (2 * math.sqrt(rows))).all()
    assert ((mean - w_col).abs() > 5 * q / (2 * math.sqrt(rows))).all()


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_moment_storage_is_unbiased(dtype):
    """E[decode(encode(x))] = x for the signed first moment (bf16, fp8 with block scales): 4096 draws
    of one row; the same 5-sigma bound on the mean, with q the grid step of each element."""
    x = torch.linspace(-1.0, 1.0, 256) * 1e-3 + 3.7e-6
    draws = 4096
    gen = torch.Generator().manual_seed(0)
    st: dict = {}
    total = torch.zeros(256)
    for _ in range(draws // 256):
        batch = x.expand(256, 256).contiguous()
        moments.store(st, "m", batch, dtype, gen, block=256)
        total += moments.load(st, "m", dtype, batch.shape, block=256).sum(0)
    mean = total / draws
    if dtype == "bf16":
        q = grid_step(x, torch.tensor(1.0), 7, -126)
    else:
        q = grid_step(x, x.abs().max() / 448.0, 3, -6)
    assert ((mean - x).abs() <= 5 * q / (2 * math.sqrt(draws))).all()


def test_fp8_moments_of_vanishing_gradients_stay_finite():
    """A moment decaying into fp32's subnormal range (a weight whose gradient is 0 for ~1000 steps)
    must not turn into NaN through an absmax scale that underflows."""
    st: dict = {}
    x = torch.full((4, 128), 1e-44)
    x[0, 0] = 2e-43  # amax / 448 rounds to 0 in fp32
    moments.store(st, "m", x, "fp8", torch.Generator().manual_seed(0), block=128)
    moments.store(st, "v", x, "fp8", torch.Generator().manual_seed(0), block=128, sqrt=True)
    assert torch.isfinite(moments.load(st, "m", "fp8", x.shape, block=128)).all()
    assert torch.isfinite(moments.load(st, "v", "fp8", x.shape, block=128, sqrt=True)).all()


def regression(fmt: str, moment_dtype: str, steps: int = 200, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(512, 64, generator=g)
    teacher = 0.1 * torch.randn(16, 64, generator=g)
    y = X @ teacher.T
    layer = native_layer(fmt, 16, 64, seed=seed + 1)
    opt = optim.SRAdamW([layer], lr=1e-2, weight_decay=0.0, moment_dtype=moment_dtype)
    return conftest.fit(layer, opt, X, y, steps)


# The teacher is Gaussian, not on any grid: the loss floor is the format's own rounding error of
# the teacher (measured: fp8_e4m3 0.05%, bf16 ~0%, int8 ~0%, nvfp4 0.6%, mxfp4 1% of the start) plus
# SR and Adam noise at lr 1e-2 (about 5x that floor). The bounds leave 3x or more of margin.
@pytest.mark.parametrize("fmt,bound", [("fp8_e4m3", 0.01), ("bf16", 0.001), ("int8", 0.002),
                                       ("nvfp4", 0.1), ("mxfp4", 0.3)])
@pytest.mark.parametrize("moment_dtype", ["fp32", "bf16", "fp8"])
def test_sradamw_drives_native_regression_down(fmt, bound, moment_dtype):
    losses = regression(fmt, moment_dtype)
    assert losses[-1] < bound * losses[0]


def test_bf16_master_weights_learn_with_sr():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16)).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 64, generator=g)
    y = X @ (0.1 * torch.randn(16, 64, generator=g)).T
    opt = optim.SRAdamW(model.parameters(), lr=1e-2, weight_decay=0.0, moment_dtype="bf16")
    losses = []
    for _ in range(200):
        loss = (model(X.bfloat16()).float() - y).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert losses[-1] < 0.01 * losses[0]  # bf16 activations bound the floor near 1e-4 of the start


@pytest.mark.parametrize("kwargs,match", [
    ({"moment_dtype": "fp16"}, "unknown moment_dtype 'fp16'; choose one of"),
    ({"moment_block": 0}, "moment_block=0"),
    ({"lr": -1e-3}, "lr=-0.001"),
    ({"eps": 0.0}, "eps=0.0"),
    ({"weight_decay": -0.1}, "weight_decay=-0.1"),
    ({"betas": (1.2, 0.9)}, r"betas\[0\]=1.2"),
])
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.SRAdamW([native_layer("fp8_e4m3", 4, 4)], **kwargs)


def test_packed_buffers_and_latent_layers_are_refused():
    layer = native_layer("fp8_e4m3", 4, 4)
    with pytest.raises(TypeError, match="pass the layer itself"):
        optim.SRAdamW([layer.w_data])
    latent = nn.Sequential(nn.Linear(4, 4))
    lowprec.apply_policy(latent, {"default": {"weight": "fp8_e4m3"}})
    with pytest.raises(TypeError, match="latent layer's weight Parameter"):
        optim.SRAdamW([latent[0]])


@pytest.mark.parametrize("block", [128, None])
def test_dense_moments_load_back_bit_for_bit(block):
    """``dense_state`` (the checkpoint form of sharded Parameters' moments: fp8 codes and block
    scales as one fp32 tensor of the weight's shape) loads back into the same codes and scales, for
    a weight whose size is not a multiple of the block and for an empty one (an FSDP2 rank may hold
    no rows of a small Parameter); fp32 moments pass through unchanged."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(3, 50)), nn.Parameter(torch.zeros(0, 64)), nn.Parameter(torch.randn(7))]
    for moment_dtype in ("fp8", "fp32"):
        opt = optim.SRAdamW(params, moment_dtype=moment_dtype, moment_block=block)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        sd = opt.state_dict()
        sd["state"] = {i: opt.dense_state(p, opt.state[p]) for i, p in enumerate(params)}
        for p, entry in zip(params, sd["state"].values()):
            assert "exp_avg_scale" not in entry and entry["exp_avg"].shape == p.shape
            assert entry["exp_avg"].dtype == torch.float32
        again = optim.SRAdamW(params, moment_dtype=moment_dtype, moment_block=block)
        again.load_state_dict(sd)
        for p in params:
            want, got = opt.state[p], again.state[p]
            assert set(got) == set(want)
            for k, v in want.items():
                if isinstance(v, torch.Tensor):
                    assert got[k].dtype == v.dtype and torch.equal(got[k].view(torch.uint8) if v.element_size() == 1 else got[k],
                                                                    v.view(torch.uint8) if v.element_size() == 1 else v), k
                else:
                    assert got[k] == v
