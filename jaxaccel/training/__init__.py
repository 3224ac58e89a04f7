"""Training mechanisms: optimizer, losses, jitted steps, the loop, metrics, pretraining runs."""

from jaxaccel.training.loop import train_loop
from jaxaccel.training.metrics import MetricsLogger, read_metrics
from jaxaccel.training.optim import lr_schedule, make_optimizer
from jaxaccel.training.pretrain import Pretraining, TrainConfig
from jaxaccel.training.steps import ModelParts, make_eval_step, make_train_step

__all__ = ["MetricsLogger", "ModelParts", "Pretraining", "TrainConfig", "lr_schedule", "make_eval_step",
           "make_optimizer", "make_train_step", "read_metrics", "train_loop"]
