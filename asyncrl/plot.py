"""``asyncrl plot LOG_PATH``: a PNG of reward, ppo_kl, ref_kld and staleness over steps."""

from __future__ import annotations

from pathlib import Path

from asyncrl.errors import ConfigError
from asyncrl.metrics import read_metrics

__all__ = ["PANELS", "plot_metrics"]

PANELS = (
    ("rollout/reward_mean", "reward (mean)"),
    ("train/ppo_kl", "ppo_kl (k3, current vs old)"),
    ("train/ref_kld", "ref_kld (k3, policy vs reference)"),
    ("async/version_offset_mean", "staleness (versions behind)"),
)


def plot_metrics(log_path: str | Path, out: str | Path | None = None) -> Path:
    """Write the PNG (default ``{log_path}/metrics.png``) and return its path."""
    rows = read_metrics(log_path)
    if not rows:
        raise ConfigError(f"no metrics in {Path(log_path) / 'metrics.jsonl'}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = Path(out) if out is not None else Path(log_path) / "metrics.png"
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), constrained_layout=True)
    for ax, (key, title) in zip(axes.flat, PANELS, strict=True):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"asyncrl run: {Path(log_path).name}")
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target
