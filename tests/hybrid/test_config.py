"""HybridConfig validation, presets, and the presets as Hydra's `model` config group."""
import pytest
from hydra import compose, initialize_config_dir

from hybrid import RNN_MODES, HybridConfig, preset, presets, store_in_hydra


@pytest.mark.parametrize("changes, words", [
    (dict(d_model=30, n_heads=4, head_dim=None), ["n_heads=4", "d_model=30"]),
    (dict(d_model=32, n_heads=4, head_dim=16), ["n_heads * head_dim", "64", "d_model=32"]),
    (dict(n_heads=4, n_kv_heads=3), ["n_kv_heads=3", "n_heads=4"]),
    (dict(window=64, max_window=32), ["window=64", "max_window=32"]),
    (dict(rnn_mode="lstm"), ["'lstm'", "stream", "chunked"]),
    (dict(xattn_heads=3), ["xattn_heads=3", "d_model=32"]),
    (dict(chunk=5), ["chunk=5", "window=16"]),
    (dict(d_model=40, head_dim=10, d_ff=160, xattn_heads=8), ["= 5 is odd", "rotary"]),
    (dict(rnn_layers=0), ["rnn_layers=0"]),
    (dict(window=0), ["window=0"]),
    (dict(dropout=1.0), ["dropout=1.0"]),
    (dict(rnn_mode="chunked", chunk_pool="max"), ["'max'", "last", "mean"]),
    (dict(rnn_mode="stream", chunk_pool="mean"), ["chunk_pool='mean'", "rnn_mode='chunked'", "'stream'"]),
])
def test_bad_config_names_value_and_rule(changes, words):
    with pytest.raises(ValueError) as e:
        preset("tiny").replace(**changes)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_memory_off_skips_memory_rules():
    """xattn_heads=3 (does not divide d_model=32) and chunk=5 (does not divide window=16) break
    rules of the memory: refused with memory on, accepted as they are with memory off."""
    with pytest.raises(ValueError, match="xattn_heads=3"):
        preset("tiny").replace(xattn_heads=3, chunk=5)
    cfg = preset("tiny").replace(memory=False, xattn_heads=3, chunk=5)
    assert (cfg.memory, cfg.xattn_heads, cfg.chunk) == (False, 3, 5)


def test_derived_fields_are_resolved():
    cfg = HybridConfig(d_model=64, n_heads=4, n_kv_heads=1)
    assert (cfg.head_dim, cfg.d_ff, cfg.compressor_hidden) == (16, 256, 32)


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="unknown preset 'huge'.*paper.*tiny"):
        preset("huge")


def test_unknown_key_fails():
    with pytest.raises(ValueError, match="unknown key.*'widht'"):
        HybridConfig.from_dict({"widht": 3})


def test_paper_preset_is_the_spec():
    c = preset("paper")
    assert (c.d_model, c.n_blocks, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff, c.vocab_size) == \
        (16384, 128, 128, 16, 128, 65536, 65536)
    assert (c.max_window, c.rnn_layers, c.chunk, c.compressor_hidden, c.xattn_heads) == \
        (131072, 16, 64, 8192, 16)
    assert c.memory and c.rnn_mode in RNN_MODES


@pytest.mark.parametrize("name", list(presets))
def test_hydra_model_group_is_the_preset(tmp_path, name):
    """`model=<name>` on a Hydra command line composes exactly the preset, and a field can be
    overridden (the group is registered from hybrid.presets: there is no second copy)."""
    store_in_hydra()
    with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
        cfg = compose(config_name=None, overrides=[f"+model={name}"])
        changed = compose(config_name=None, overrides=[f"+model={name}", "model.dropout=0.25"])
    assert HybridConfig.from_dict(cfg.model) == presets[name]
    assert HybridConfig.from_dict(changed.model) == presets[name].replace(dropout=0.25)
