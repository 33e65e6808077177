"""A native weight's packed storage is what state_dict, torch.distributed.checkpoint and a row
shard see: no float form is needed to save, load or split it."""
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

import lowprec
from lowprec import QTensor


def native_model(fmt, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(128, 48, bias=False))
    lowprec.apply_policy(model, {"default": {"weight": fmt, "storage": "native"}})
    return model


@pytest.mark.parametrize("fmt,row_bytes", [("ternary", 32), ("binary", 16), ("fp4_e2m1", 64), ("nvfp4", 64),
                                           ("fp8_e4m3", 128)])
def test_packed_rows_are_weight_rows(fmt, row_bytes):
    """``w_data`` is (out_features, row_bytes): rows 8..24 of it (and of a per-row/block scale) are
    the packed form of rows 8..24 of the weight, bit for bit."""
    layer = native_model(fmt)[0]
    assert tuple(layer.w_data.shape) == (48, row_bytes)
    q = layer.native_weight
    rows = slice(8, 24)
    scale = q.scale if q.scale is None or q.scale.dim() == 0 or q.scale.numel() == 1 else q.scale[rows]
    shard = QTensor(layer.w_data[rows], scale, q.global_scale, q.fmt, (16, 128), q.padded_last)
    assert torch.equal(shard.dequantize(), q.dequantize()[rows])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("fmt", ["ternary", "binary", "nvfp4", "fp8_e4m3"])
def test_distributed_checkpoint_round_trips_the_packed_form(fmt, tmp_path):
    saved = native_model(fmt, seed=0)
    dcp.save(saved.state_dict(), checkpoint_id=str(tmp_path))
    loaded = native_model(fmt, seed=1)
    assert not torch.equal(loaded[0].w_data, saved[0].w_data)
    state = loaded.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path))
    loaded.load_state_dict(state)
    for name, t in saved.state_dict().items():
        got = loaded.state_dict()[name]
        assert got.dtype == t.dtype and torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name
