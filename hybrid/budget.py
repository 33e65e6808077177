"""`python -m hybrid.budget model=paper precision=paper`: the budget report as a Hydra app.

Config groups: `model` (the presets of `hybrid/presets.py`) and `precision` (`configs/precision/`); the precision is
optional (without it every weight is counted at `default_bits`). Other keys: `window` (tokens per
segment for FLOPs and the KV cache; default `model.window`), `kv_bits`, `act_bits` (memory bank),
`other_bits` (biases and norms), `check_meta` (build on the meta device and compare counts).
The numbers and formulas are in `hybrid.accounting`; `component_budget` is re-exported here.

`parallel.gpus=auto` (or `=N`) answers another question instead: the smallest number of
`parallel.gpu_gb` GPUs (or the best dp x tp layout of N) that trains the model under the policy
(under every shipped policy when none is given), with the per-GPU breakdown of weights,
gradients, optimizer state, gathered weights and activations (`hybrid.parallel_budget`).

Bits per weight under a policy: `PrecisionPolicy.from_config(cfg.precision).resolve(name).weight.effective_bits`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import lowprec

from .accounting import (PAPER_TABLE1, ComponentBudget, component_budget, format_report,  # noqa: F401
                         param_counts, state_bytes)
from .config import HybridConfig
from .presets import store_in_hydra

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _budget_node() -> dict:
    return {
        "defaults": ["_self_", {"model": "paper"}, {"precision": None},
                     {"override hydra/job_logging": "none"}, {"override hydra/hydra_logging": "none"}],
        "window": None,
        "kv_bits": 16,
        "act_bits": 16,
        "default_bits": 16,
        "other_bits": 32,
        "check_meta": True,
        # training on several GPUs: gpus = null (off) | auto (the smallest count) | N
        "parallel": {"gpus": None, "gpu_gb": 80.0, "reserve_gb": 4.0, "micro_batch": 1},
        # a report, not a run: no output directory, no log files
        "hydra": {"output_subdir": None, "run": {"dir": "."}},
    }


def bits_from_policy(precision_cfg) -> Callable[[str], float]:
    """bits_of(module_name) = the policy's weight `effective_bits` for that module."""
    policy = lowprec.PrecisionPolicy.from_config(precision_cfg)
    return lambda name: float(policy.resolve(name).weight.effective_bits)


def _run(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig  # Hydra comes with the [train] extra, not the core
    from omegaconf import OmegaConf

    model_cfg = HybridConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    if cfg.parallel.gpus is not None:
        print(_parallel_report(model_cfg, cfg))
        return
    if cfg.get("precision") is not None:
        bits_of = bits_from_policy(cfg.precision)
        name = HydraConfig.get().runtime.choices.get("precision") or "policy"
    else:
        default = float(cfg.default_bits)
        bits_of, name = (lambda _n: default), f"none (every weight at {cfg.default_bits:g} bits)"
    print(format_report(model_cfg, bits_of, window=cfg.window, other_bits=cfg.other_bits,
                        kv_bits=cfg.kv_bits, act_bits=cfg.act_bits, policy_name=name,
                        check_meta=cfg.check_meta))


def _parallel_report(model_cfg: HybridConfig, cfg) -> str:
    import yaml
    from hydra.core.hydra_config import HydraConfig

    from .parallel_budget import format_parallel_report

    if cfg.get("precision") is not None:
        name = HydraConfig.get().runtime.choices.get("precision") or "policy"
        policies = {name: lowprec.PrecisionPolicy.from_config(cfg.precision)}
    else:
        policies = {p.stem: lowprec.PrecisionPolicy.from_config(yaml.safe_load(p.read_text()))
                    for p in sorted((CONFIG_DIR / "precision").glob("*.yaml"))}
    par = cfg.parallel
    return format_parallel_report(model_cfg, policies, gpus=par.gpus, gpu_gb=float(par.gpu_gb),
                                  reserve_gb=float(par.reserve_gb), window=cfg.window,
                                  micro_batch=int(par.micro_batch))


def main() -> None:
    import hydra  # the [train] extra: `import hybrid` must work without it
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="hybrid_budget", node=_budget_node())
    store_in_hydra()  # the `model` group: hybrid's presets
    hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="hybrid_budget")(_run)()


if __name__ == "__main__":
    main()
