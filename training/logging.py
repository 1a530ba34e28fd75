"""Per-epoch log rows: kept in memory (and in every checkpoint), written as CSV, plotted, tracked.

Every column of ``log.csv`` but ``epoch`` is also a tracker scalar (:func:`epoch_scalars`) at step
``epoch``, under the tag ``GROUP/NAME`` (:func:`scalar_tag`): ``train/loss`` for ``train_loss``,
``val/pgd_avg`` (or ``seen/pgd_avg``) for ``val_pgd_avg``, ``run/lr`` for ``lr``.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from core.files import atomic_write

# train_* columns that are not a loss part or an accuracy: timing, throughput and memory of the epoch
SPEED_COLUMNS = ("train_time_s", "train_images_per_s", "train_step_time_s", "train_gpu_peak_mem_gb")
_GROUPS = ("train", "val", "seen")


def scalar_tag(column: str) -> str:
    """The tracker tag of a ``log.csv`` column: ``train_loss`` -> ``train/loss``, ``lr`` -> ``run/lr``."""
    group, _, name = column.partition("_")
    return f"{group}/{name}" if group in _GROUPS and name else f"run/{column}"


def epoch_scalars(row: dict) -> dict[str, float]:
    """A log row's numbers by tracker tag (every column but ``epoch``, which is the step)."""
    return {scalar_tag(k): float(v) for k, v in row.items() if k != "epoch"}


class History:
    """The run's per-epoch metrics; ``write`` rewrites ``log.csv`` atomically from the rows."""

    def __init__(self, csv_path: Path) -> None:
        self.csv_path = Path(csv_path)
        self.rows: list[dict] = []

    def append(self, row: dict) -> None:
        self.rows.append(dict(row))

    def write(self) -> None:
        if not self.rows:
            return
        frame = pd.DataFrame(self.rows)
        atomic_write(self.csv_path, lambda f: frame.to_csv(f, index=False), binary=False)

    def plot(self, path: Path) -> None:
        """Training curves: loss parts, natural/PGD accuracy (raw and averaged; held-out or ``seen_``), eps and lr."""
        if not self.rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        df = pd.DataFrame(self.rows)
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        parts = [c for c in df.columns
                 if c.startswith("train_") and not c.startswith("train_acc") and c not in SPEED_COLUMNS]
        for col in parts:  # the loss and the parts the run's method logs
            if df[col].abs().sum() > 0:
                axes[0].plot(df.epoch, df[col], label=col.removeprefix("train_"))
        axes[0].set(title="training loss", xlabel="epoch")
        held_out = "val_clean" in df  # else seen_*: training images (no held-out split)
        prefix = "val_" if held_out else "seen_"
        for col, style in (("clean", "-"), ("pgd", "-"), ("clean_avg", "--"), ("pgd_avg", "--")):
            if prefix + col in df:
                axes[1].plot(df.epoch, df[prefix + col], style, label=col)
        title = "held-out accuracy" if held_out else "accuracy on training images (no held-out split)"
        axes[1].set(title=f"{title} (PGD at the final eps)", xlabel="epoch", ylim=(0, 1))
        axes[2].plot(df.epoch, df.eps_x255, label="eps x255")
        ax2 = axes[2].twinx()
        ax2.plot(df.epoch, df.lr, "r")
        ax2.set_ylabel("learning rate", color="r")
        axes[2].set(title="schedules", xlabel="epoch", ylabel="train eps x255")
        for ax in axes[:3]:
            ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))
        plt.close(fig)
