"""``python -m experiments.train``: train a hybrid model in a precision policy, on real text.

    python -m experiments.train                                   # the main job (CPU, minutes)
    python -m experiments.train precision=ternary optim=bitnet train.steps=2000
    python -m experiments.train '+precision.override={match: "blocks.*.ffn.*", weight: ternary}'
    python -m experiments.train hydra.run.dir=runs/a resume=auto  # continue run a (same command again)
    tensorboard --logdir runs

The run directory (``run_dir``, by default Hydra's output directory) receives ``config.yaml`` (the
resolved config), ``precision_report.md`` (the policy's per-layer table and the optimizer's
memory), ``tb/`` (TensorBoard events), ``checkpoints/ckpt-<step>.pt`` and ``summary.json`` (final
and best validation loss / bits per character, the validation curve, throughput, the sample). The loop
and its parts (checkpointing, evaluation, the NaN guard, metrics) are in :mod:`experiments.trainer`;
each step in :mod:`experiments.loop`; checkpoints in :mod:`experiments.checkpoint`; configuration
checks in :mod:`experiments.build`.

Exit status: 0 done; 2 bad input (config, data, checkpoint), with one line naming the cause;
1 stopped after ``train.max_bad_steps`` consecutive steps with inf/NaN, naming the first layer
where non-finite values appeared (the last good checkpoint is kept).
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .build import ConfigError
from .checkpoint import CorruptCheckpointError
from .trainer import NonFiniteError, Trainer, log

__all__ = ["NonFiniteError", "main", "resume_command", "train"]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run the training job described by ``cfg`` (the composed config); returns the summary."""
    trainer = Trainer(cfg)  # every ConfigError surfaces here, before anything is written
    try:
        return trainer.train()
    except KeyboardInterrupt:
        if trainer.resumable:
            print(f"\ninterrupted; to continue this run:\n  {resume_command(trainer.run_dir)}", file=sys.stderr)
        raise


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in ``run_dir``: this run's command-line overrides, the
    same run directory, ``resume=auto``."""
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not launched by Hydra (train() called directly)
        overrides = []
    keep = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.run.dir=", "resume="))]
    return " ".join(["python -m experiments.train", *(shlex.quote(o) for o in keep),
                     shlex.quote(f"hydra.run.dir={run_dir}"), "resume=auto"])


@hydra.main(config_path="../configs", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except KeyboardInterrupt:
        sys.exit(130)
    except (ConfigError, CorruptCheckpointError) as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
