"""``python -m experiments.train``: train a hybrid model in a precision policy, on real text.

    python -m experiments.train                                   # the main job (CPU, minutes)
    python -m experiments.train precision=ternary optim=bitnet train.steps=2000
    python -m experiments.train '+precision.override={match: "blocks.*.ffn.*", weight: ternary}'
    python -m experiments.train hydra.run.dir=runs/a resume=auto  # continue run a (same command again)
    torchrun --nproc-per-node 2 -m experiments.train hydra.run.dir=runs/b   # 2 processes (docs/parallel.md)
    tensorboard --logdir runs

The run directory (``run_dir``, by default Hydra's output directory) receives ``config.yaml`` (the
resolved config), ``precision_report.md`` (the policy's per-layer table and the optimizer's
memory), ``tb/`` (TensorBoard events), ``checkpoints/ckpt-<step>.pt`` and ``summary.json`` (final
and best validation loss / bits per character, the validation curve, throughput, the sample); a run
on several processes writes sharded checkpoints ``checkpoints/dcp-<step>/`` and, at its end, the
newest as ``checkpoints/ckpt-<step>.pt``; only its rank 0 writes the other files. Where each
part lives:

- the loop, metrics and the NaN guard: :mod:`experiments.trainer`;
- each step, and the scoring of validation windows: :mod:`experiments.loop`;
- the run's checkpoints (``resume``, restore, ``init_from``, saving, sharded ones):
  :mod:`experiments.checkpointing`; the one-file format: :mod:`experiments.checkpoint`; the sharded
  format: :mod:`experiments.sharded_checkpoint`;
- validation, retrieval accuracy and the sample during a run: :mod:`experiments.evaluation_loop`;
- configuration checks: :mod:`experiments.build`.

Exit status: 0 done; 2 bad input (config, data, checkpoint), with one line naming the cause;
1 stopped after ``train.max_bad_steps`` consecutive steps with inf/NaN, naming the first layer
where non-finite values appeared (the last good checkpoint is kept).
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

import hydra
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from .build import ConfigError, resolve_device
from .checkpoint import CorruptCheckpointError
from .parallel import Distributed, ParallelConfig, init_distributed, log_on_main_only
from .trainer import NonFiniteError, Trainer, log

__all__ = ["NonFiniteError", "main", "resume_command", "start_processes", "train"]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run the training job described by ``cfg`` (the composed config); returns the summary.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) this process first joins the process group and the
    device mesh (``cfg.parallel``, :mod:`experiments.parallel`), takes rank 0's ``run_dir``, and
    logs warnings and errors only unless it is rank 0; the group is left at the end."""
    d = start_processes(cfg)
    try:
        trainer = Trainer(cfg, d)  # every ConfigError surfaces here, before anything is written
        try:
            summary = trainer.train()
        except KeyboardInterrupt:
            if trainer.resumable and d.is_main:
                print(f"\ninterrupted; to continue this run:\n  {resume_command(trainer.run_dir)}", file=sys.stderr)
            raise
        if d.mesh is not None:
            dist.barrier()
        return summary
    finally:
        if d.mesh is not None and dist.is_initialized():
            dist.destroy_process_group()


def start_processes(cfg: DictConfig) -> Distributed:
    """Join the processes ``torchrun`` started (a no-op for one process): ``init_distributed`` on the
    device ``train.device`` names (CUDA: ``cuda:LOCAL_RANK``; CPU: gloo), ranks other than 0 logging
    warnings only, the layout in the log, and one ``run_dir`` for all: rank 0's (Hydra's default directory carries the
    second at which each process started)."""
    try:
        pcfg = ParallelConfig.from_config(cfg.get("parallel"))
    except ValueError as e:
        raise ConfigError(f"parallel: {e}") from None
    device = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one process checks train.device with the rest of train
        device = resolve_device(str(cfg.train.device))
    try:
        d = init_distributed(pcfg, device=None if device is None or device.type == "cuda" else device)
    except ValueError as e:
        raise ConfigError(f"parallel: {e}") from None
    if d.mesh is None:
        return d
    log_on_main_only(d)
    log.info("processes: %s", d.describe())
    box = [str(cfg.run_dir)]
    dist.broadcast_object_list(box, src=0)
    with open_dict(cfg):
        cfg.run_dir = box[0]
    return d


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in ``run_dir``: this run's command-line overrides, the
    same run directory, ``resume=auto`` (under ``torchrun`` when this run was)."""
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not launched by Hydra (train() called directly)
        overrides = []
    keep = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.run.dir=", "resume="))]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launch = f"torchrun --nproc-per-node {world} -m experiments.train" if world > 1 else "python -m experiments.train"
    return " ".join([launch, *(shlex.quote(o) for o in keep),
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
