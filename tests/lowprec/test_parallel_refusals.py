"""What tensor parallelism and native row-sharding do not support is refused by name, before any
weight is touched (no process group is needed to reach these checks)."""
import pytest
import torch
from torch import nn

import lowprec
from lowprec.distributed import shard_native_layer
from lowprec.tensor_parallel import QColwiseParallel, QRowwiseParallel


class OneRank:
    """The part of a DeviceMesh the checks read before any collective."""

    def size(self):
        return 1


def layers(policy, bias=False):
    model = nn.ModuleDict({"fc": nn.Linear(16, 8, bias=bias), "emb": nn.Embedding(32, 16)})
    lowprec.apply_policy(model, policy)
    return model


class Ranks(OneRank):
    def __init__(self, n):
        self.n = n

    def size(self):
        return self.n

    def get_local_rank(self):
        return 0


def test_a_native_split_that_does_not_fill_whole_bytes_is_refused():
    """Binary codes pack 8 to a byte: 16 columns over 4 ranks would start a rank's columns inside
    a byte. Nothing is changed by the refusal."""
    fc = layers({"default": {"weight": "binary", "storage": "native"}})["fc"]
    before = fc.w_data.clone()
    with pytest.raises(ValueError, match=r"4 columns of its binary\[absmean/tensor\] weight do not fill whole bytes"):
        QRowwiseParallel()._apply(fc, Ranks(4))
    with pytest.raises(ValueError, match="8 output features do not split over 3 ranks"):
        QColwiseParallel()._apply(fc, Ranks(3))
    assert torch.equal(fc.w_data, before) and fc.in_features == 16 and fc.out_features == 8


def test_tensor_parallel_styles_take_only_linear_layers():
    emb = layers({"default": {"weight": "fp8_e4m3"}})["emb"]
    with pytest.raises(NotImplementedError, match="applies to QLinear and nn.Linear, not QEmbedding"):
        QColwiseParallel()._apply(emb, OneRank())


def test_row_parallel_refuses_a_bias_it_would_add_once_per_rank():
    fc = layers({"default": {"weight": "fp8_e4m3"}}, bias=True)["fc"]
    before = fc.weight.detach().clone()
    with pytest.raises(NotImplementedError, match="row-parallel QLinear with a bias"):
        QRowwiseParallel()._apply(fc, OneRank())
    assert torch.equal(fc.weight.detach(), before) and fc.in_features == 16  # nothing changed


def test_row_sharding_refuses_a_native_embedding_and_a_latent_layer():
    model = layers({"default": {"weight": "ternary", "storage": "native"}})
    with pytest.raises(NotImplementedError, match="emb: row-sharding a native QEmbedding is not supported"):
        shard_native_layer(model["emb"], OneRank(), name="emb")
    latent = layers({"default": {"weight": "ternary"}})["fc"]
    with pytest.raises(ValueError, match="fc: not a native layer"):
        shard_native_layer(latent, OneRank(), name="fc")
