"""training_curves.png: what a researcher watches during a SPLADE run, one panel per quantity."""

from pathlib import Path

LOSS_TERMS = ("loss", "ranking_loss", "mse_loss", "flops_q_loss", "flops_d_loss")
PANELS = [
    ("loss terms", LOSS_TERMS),
    ("FLOPS (raw)", ("flops_q", "flops_d")),
    ("active dimensions", ("active_dims_q", "active_dims_d")),
    ("lambda and learning rate", ("lambda_q", "lambda_d", "learning_rate")),
    ("dev retrieval (in training)", ("eval_mrr@10", "eval_recall@1000")),
]


def plot_training_curves(log_history: list[dict], path: Path) -> None:
    """One line per logged key against the optimizer step; panels with nothing logged are left out."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a training box
    import matplotlib.pyplot as plt

    panels = [(title, [k for k in keys if any(k in e for e in log_history)]) for title, keys in PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for axis, (title, keys) in zip(axes[0], panels):
        for key in keys:
            points = [(e["step"], e[key]) for e in log_history if key in e]
            axis.plot(*zip(*points), label=key, marker="o" if key.startswith("eval_") else None)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
