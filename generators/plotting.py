"""The loss curve written beside a trained generator (``loss.png``); matplotlib is imported only here, and
only when a run finishes."""

from __future__ import annotations

from pathlib import Path

from rlsynth.generators.training import TrainResult


def plot_history(result: TrainResult, path: Path, kind: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not result.history:
        return
    steps = [h["step"] for h in result.history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["loss"] for h in result.history], label="train loss")
    ax.plot(steps, [h["val_loss"] for h in result.history], label="validation loss")
    ax.set_xlabel("step")
    ax.set_title(f"{kind} training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# Upper bounds on a checkpoint's architecture sizes, far above any preset (gpu-paper's largest width is
