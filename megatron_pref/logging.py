"""Console lines, progress bars, TensorBoard, wandb and a JSONL metrics file. Rank 0 only.

Metric names follow TRL (``rewards/chosen``, ``rewards/margins``, ``logps/rejected``, ...);
evaluation metrics are prefixed ``eval/``.
"""

from __future__ import annotations

import json
import logging as std_logging
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch.distributed as dist

logger = std_logging.getLogger("megatron_pref")


def is_logging_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def setup_console_logging() -> None:
    level = std_logging.INFO if is_logging_rank() else std_logging.WARNING
    std_logging.basicConfig(level=level, format="%(message)s", stream=sys.stdout, force=True)
    # megatron-core logs its buckets and optimizer config at INFO: keep the console to ours.
    std_logging.getLogger("megatron").setLevel(std_logging.WARNING)


def progress_bar(total: int, desc: str, unit: str = "pair", disable: bool = False):
    """tqdm on rank 0 (to stderr); a silent stand-in elsewhere."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=disable or not is_logging_rank(),
                dynamic_ncols=True, leave=False, mininterval=1.0)


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class MetricsLogger:
    """One sink for every metric: console, TensorBoard, wandb, JSONL."""

    def __init__(self, train_iters: int, tensorboard_dir: Optional[str] = None,
                 wandb_project: Optional[str] = None, wandb_exp_name: Optional[str] = None,
                 wandb_save_dir: Optional[str] = None, metrics_file: Optional[str] = None,
                 run_config: Optional[dict] = None):
        self.train_iters = train_iters
        self.active = is_logging_rank()
        self.start_time = time.time()
        self.start_iteration: Optional[int] = None
        self.tensorboard = None
        self.wandb_run = None
        self.metrics_file = None
        if not self.active:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=tensorboard_dir)
        if wandb_project:
            import wandb

            # WANDB_MODE=offline works with no network; the run syncs later with `wandb sync`.
            self.wandb_run = wandb.init(project=wandb_project, name=wandb_exp_name,
                                        dir=wandb_save_dir or tensorboard_dir, config=run_config or {})
        if metrics_file:
            Path(metrics_file).parent.mkdir(parents=True, exist_ok=True)
            self.metrics_file = open(metrics_file, "a", buffering=1)

    def log(self, iteration: int, metrics: dict, console: bool = True) -> None:
        if not self.active:
            return
        if console and self.start_iteration is None:
            # The ETA counts steps done in this process (a resumed run starts mid-way).
            self.start_iteration = iteration - 1
        if self.tensorboard is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tensorboard.add_scalar(name, value, iteration)
            self.tensorboard.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(dict(metrics), step=iteration)
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps({"iteration": iteration, "time": time.time(), **metrics}) + "\n")
        if console:
            logger.info(self.console_line(iteration, metrics))

    def console_line(self, iteration: int, metrics: dict) -> str:
        elapsed = time.time() - self.start_time
        done = iteration - (self.start_iteration if self.start_iteration is not None else iteration - 1)
        remaining = (self.train_iters - iteration) * elapsed / max(done, 1)
        width = len(str(self.train_iters))
        parts = [f"step {iteration:>{width}}/{self.train_iters}"]
        for name, fmt in (("loss", ".4f"), ("rewards/accuracies", ".3f"), ("rewards/margins", ".4f"),
                          ("rewards/chosen", ".4f"), ("rewards/rejected", ".4f"), ("lr", ".2e"),
                          ("grad_norm", ".3f"), ("tokens_per_sec", ".0f"), ("packing_efficiency", ".3f")):
            if name in metrics and metrics[name] is not None:
                short = name.split("/")[-1] if name.startswith("rewards/") else name
                parts.append(f"{short} {metrics[name]:{fmt}}")
        parts.append(f"elapsed {_format_duration(elapsed)} eta {_format_duration(remaining)}")
        return " | ".join(parts)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.metrics_file is not None:
            self.metrics_file.close()
