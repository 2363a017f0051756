"""``plot_rewards``: the reward curve of a run (``reward_curve.png`` in the output directory)."""

from __future__ import annotations

from typing import Dict, List


def plot_rewards(history: List[Dict[str, float]], path: str) -> str:
    """Reward (and its 10-step moving average) per step to ``path`` (PNG, matplotlib Agg backend).

    ``history``: the trainer's metric rows (each with ``step`` and ``reward``), oldest first. Returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    rew = [r["reward"] for r in history]
    avg = [sum(rew[max(0, i - 9):i + 1]) / len(rew[max(0, i - 9):i + 1]) for i in range(len(rew))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, rew, color="#9ab", lw=1, label="reward (batch mean)")
    ax.plot(steps, avg, color="#c33", lw=2, label="10-step moving average")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_ylim(min(0.0, min(rew)) - 0.02, max(1.0, max(rew)) + 0.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("GRPO reward")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
