"""A training run's per-step log (train_log.csv) and its picture (loss_curve.png).

    from campe.train.log import LOG_FILE, write_log, read_log, plot_loss_curve
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from campe.core.io import atomic_write_bytes


LOG_FILE = "train_log.csv"


# ---------------------------------------------------------------------------------------------------- outputs

def write_log(path: Path, rows: list[dict[str, float]], keep_upto: int | None = None) -> None:
    """Append rows to the CSV log (header from the first row); keep_upto: first drop rows past that step."""
    if keep_upto is not None and path.exists():
        with path.open() as f:
            old = [r for r in csv.DictReader(f) if int(float(r["step"])) <= keep_upto]
        buf = io.StringIO()
        if old:
            w = csv.DictWriter(buf, fieldnames=list(old[0]))
            w.writeheader()
            w.writerows(old)
        atomic_write_bytes(path, buf.getvalue().encode())
    if not rows:
        return
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)


def read_log(path: str | Path) -> list[dict[str, float]]:
    path = Path(path)
    if not path.exists():
        return []
    with path.open() as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def plot_loss_curve(rows: list[dict[str, float]], out_png: str | Path, title: str = "") -> Path:
    """Each "*loss" column of the log against the step (log-scale y when all positive)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in rows[0] if k == "loss" or k.endswith("_loss")] if rows else []
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    for k in keys:
        ax.plot(steps, [r.get(k, float("nan")) for r in rows], label=k, lw=1.8 if k == "loss" else 1.0)
    if rows and all(r.get(k, 1.0) > 0 for r in rows for k in keys):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if keys:
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(out_png, buf.getvalue())
    return Path(out_png)
