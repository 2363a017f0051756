"""The lean GRPO trainer: :class:`GRPODataset`, :class:`GRPOConfig`, :class:`GRPOTrainer`."""

from .config import GRPOConfig
from .data import DatasetFormatError, GRPODataset
from .trainer import GRPOTrainer, Rollout, plot_rewards

__all__ = ["GRPOConfig", "GRPODataset", "DatasetFormatError", "GRPOTrainer", "Rollout", "plot_rewards"]
