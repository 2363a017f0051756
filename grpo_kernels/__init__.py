"""grpo_kernels: a fused, trustworthy GRPO loss for PyTorch, and a lean trainer that uses it.

Drop-in use::

    from grpo_kernels import grpo_loss
    loss = grpo_loss(logits, tokens, rewards, mask, group_size=G)       # (S, T, V) logits
    loss.backward()

Importing the package does not import triton, build extensions or touch a GPU; it registers the
package's own ``torch.library`` ops (``grpo_kernels::*``) so that ``torch.compile`` can trace them.
"""

from ._version import __version__
from .fused_linear import FusedLinearGRPOLoss, fused_linear_grpo_loss
from .kernels import available_backends
from .loss import GRPOLoss, grpo_loss, token_logprobs
from .options import LossOptions
from .reference import compute_grpo_loss, group_advantages, group_weights
from .trainer import GRPOConfig, GRPODataset, GRPOTrainer

__all__ = [
    "__version__",
    "compute_grpo_loss",
    "grpo_loss",
    "GRPOLoss",
    "LossOptions",
    "token_logprobs",
    "fused_linear_grpo_loss",
    "FusedLinearGRPOLoss",
    "group_weights",
    "group_advantages",
    "available_backends",
    "GRPOConfig",
    "GRPODataset",
    "GRPOTrainer",
]
