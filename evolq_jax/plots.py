"""PNG plots of a search (matplotlib, no display needed)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_fitness(history: list, path: str, title: str = "", start: float | None = None) -> str:
  """Best calibration fitness vs candidates evaluated; grey lines mark passes."""
  fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
  x = [h["candidates"] for h in history]
  best = [h["best"] for h in history]
  if start is not None:
    x, best = [0] + x, [start] + best
  ax.step(x, best, where="post", color="C0", lw=1.5, label="best so far (accepted)")
  x = x[1:] if start is not None else x
  ax.scatter(x, [h["gen_min"] for h in history], s=6, color="C1", alpha=0.6,
             label="generation's best candidate")
  passes = sorted({h["pass"] for h in history})
  for p in passes[1:]:
    first = next(h["candidates"] for h in history if h["pass"] == p)
    ax.axvline(first, color="0.8", lw=0.8, zorder=0)
  ax.set_xlabel("candidates evaluated")
  ax.set_ylabel("calibration loss (lower is better)")
  ax.set_title(title or "Evol-Q search")
  ax.legend(loc="upper right", fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
