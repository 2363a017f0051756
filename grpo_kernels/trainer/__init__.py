"""The lean GRPO trainer and the RL application around it.

* :mod:`.config` -- :class:`GRPOConfig`, every knob in one dataclass (YAML/JSON loadable).
* :mod:`.data` -- :class:`GRPODataset`, prompts (and optionally fixed responses / rewards) from JSONL.
* :mod:`.rewards` -- the reward-function registry, a local reward model, weighted sums.
* :mod:`.trainer` -- :class:`GRPOTrainer`, one step = rollout, reward, old/ref log-probs, updates, metrics;
  with :mod:`.rollout` (generation, :class:`Rollout`, log-probs), :mod:`.checkpoint` (save / resume) and
  :mod:`.plotting` (:func:`plot_rewards`).
* :mod:`.demo` -- the built-in CPU demo (a tiny random-init Llama learns to copy digits).
* :mod:`.cli` -- ``grpo-kernels train``.
"""

from .config import GRPOConfig
from .data import DatasetFormatError, GRPODataset
from .plotting import plot_rewards
from .rollout import Rollout
from .trainer import GRPOTrainer

__all__ = ["GRPOConfig", "GRPODataset", "DatasetFormatError", "GRPOTrainer", "Rollout", "plot_rewards"]
