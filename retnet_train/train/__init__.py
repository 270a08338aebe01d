"""The trainer: `train(cfg)` runs a composed config (see retnet_train.config.load_config)."""

from .trainer import Trainer, TooManyBadSteps, train

__all__ = ["Trainer", "TooManyBadSteps", "train"]
