"""hybrid: the paper's Transformer-RNN (token embeddings, LSTM memory over chunks, gated
cross-attention fusion, GQA blocks), from a tiny test model to the full 16,384-wide build.

    from hybrid import HybridLM, preset
    model = HybridLM(preset("small"))
    logits, state = model(tokens)              # tokens (B, T <= window)
    logits, state = model(next_tokens, state)  # the next segment of the same document

Precision is never chosen here: `lowprec.apply_policy(model, policy)` swaps the `nn.Linear` /
`nn.Embedding` modules by name. Budget report: `python -m hybrid.budget model=paper precision=paper`.
"""
from .attention import memory_mask
from .accounting import PAPER_TABLE1, component_budget, param_counts, weight_modules
from .config import RNN_MODES, HybridConfig
from .model import HybridLM
from .presets import preset, presets, store_in_hydra
from .state import HybridState
from .tbptt import TBPTTStep, tbptt

__all__ = [
    "HybridConfig", "HybridLM", "HybridState", "RNN_MODES", "presets", "preset", "store_in_hydra",
    "tbptt", "TBPTTStep", "memory_mask",
    "param_counts", "weight_modules", "component_budget", "PAPER_TABLE1",
]
