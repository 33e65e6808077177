"""Named `HybridConfig`s, from the tiny test model to the paper's exact 16,384-wide build.

| name      | d_model | blocks | heads q/kv × size | FFN   | vocab | window | LSTM | params (exact: `hybrid.budget`) |
|-----------|---------|--------|-------------------|-------|-------|--------|------|---------------------------------|
| paper     | 16384   | 128    | 128/16 × 128      | 65536 | 65536 | 131072 | 16   | 392,731,140,096 (392.73B)         |
| slice16k  | 16384   | 1      | 128/16 × 128      | 65536 | 65536 | 2048   | 1    | 8.96B  (one width-16384 GPU step) |
| medium    | 512     | 8      | 8/2 × 64          | 2048  | 256   | 512    | 2    | 28.6M  (CPU in minutes)           |
| small     | 256     | 8      | 8/2 × 32          | 1024  | 256   | 256    | 1    | 6.7M   (Shakespeare, byte-level)  |
| mini      | 128     | 4      | 4/2 × 32          | 512   | 2048  | 64     | 1    | 1.5M   (the main job, 2 CPU cores)  |
| tiny      | 32      | 2      | 4/2 × 8           | 128   | 32    | 16     | 2    | 50K    (tests)                    |

This file is the only place the presets are written down. The Hydra apps (`python -m
experiments.train model=tiny`, `python -m hybrid.budget model=paper`) read them as the config
group `model`, registered from here by :func:`store_in_hydra`; any field can then be overridden on
the command line (`model.window=64`).
"""
from __future__ import annotations

from .config import HybridConfig

presets: dict[str, HybridConfig] = {
    # The paper as specified: 128 pre-norm GQA blocks of width 16384, a 16-layer LSTM memory over
    # 64-token chunks, compressor 16384 -> 8192 -> 16384, 16-head cross-attention fusion.
    "paper": HybridConfig(
        d_model=16384, n_blocks=128, n_heads=128, n_kv_heads=16, head_dim=128, d_ff=65536,
        vocab_size=65536, window=131072, max_window=131072,
        memory=True, rnn_layers=16, rnn_mode="stream", chunk=64, compressor_hidden=8192,
        xattn_heads=16, max_memory=2048, tbptt_segments=2,
    ),
    # Every width-16384 layer of the paper once, with a short window and position table so it
    # fits one GPU.
    "slice16k": HybridConfig(
        d_model=16384, n_blocks=1, n_heads=128, n_kv_heads=16, head_dim=128, d_ff=65536,
        vocab_size=65536, window=2048, max_window=2048,
        memory=True, rnn_layers=1, rnn_mode="stream", chunk=64, compressor_hidden=8192,
        xattn_heads=16, max_memory=64, tbptt_segments=2,
    ),
    # ~28.6M parameters, byte-level: trains on CPU in minutes.
    "medium": HybridConfig(
        d_model=512, n_blocks=8, n_heads=8, n_kv_heads=2, head_dim=64, d_ff=2048,
        vocab_size=256, window=512, max_window=512,
        memory=True, rnn_layers=2, rnn_mode="chunked", chunk=32, compressor_hidden=256,
        xattn_heads=8, max_memory=64, tbptt_segments=2, dropout=0.1,
    ),
    # ~6.7M parameters, byte-level: sized to the 5 MB Shakespeare corpus (a larger model overfits it
    # within a few epochs).
    "small": HybridConfig(
        d_model=256, n_blocks=8, n_heads=8, n_kv_heads=2, head_dim=32, d_ff=1024,
        vocab_size=256, window=256, max_window=256,
        memory=True, rnn_layers=1, rnn_mode="chunked", chunk=16, compressor_hidden=128,
        xattn_heads=4, max_memory=64, tbptt_segments=2, dropout=0.1,
    ),
    # The main job's model: every component of the hybrid at a size that 2 CPU cores train to
    # ~2.36 bits/char on the plays in four minutes (BPE tokens of 2.67 chars; the vocabulary
    # comes from the tokenizer). One segment per TBPTT step: at this size updates per token count
    # for more than gradient paths across segments.
    "mini": HybridConfig(
        d_model=128, n_blocks=4, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=512,
        vocab_size=2048, window=64, max_window=64,
        memory=True, rnn_layers=1, rnn_mode="chunked", chunk=16, compressor_hidden=64,
        xattn_heads=4, max_memory=64, tbptt_segments=1, dropout=0.0,
    ),
    # For tests: every component, a few thousand parameters per block.
    "tiny": HybridConfig(
        d_model=32, n_blocks=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=128,
        vocab_size=32, window=16, max_window=32,
        memory=True, rnn_layers=2, rnn_mode="stream", chunk=4, compressor_hidden=16,
        xattn_heads=4, max_memory=8, tbptt_segments=2,
    ),
}


def preset(name: str) -> HybridConfig:
    """The named preset; `ValueError` naming the valid ones for an unknown name."""
    try:
        return presets[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(presets)}") from None


def store_in_hydra(group: str = "model") -> None:
    """Register every preset in Hydra's ConfigStore as ``<group>=<name>`` (fields as keys)."""
    from hydra.core.config_store import ConfigStore  # Hydra comes with the [train] extra, not the core

    store = ConfigStore.instance()
    for name, cfg in presets.items():
        store.store(group=group, name=name, node=cfg.to_dict())
