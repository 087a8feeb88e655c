"""What happens around the search loop's units, one hook each.

The engine (search/engine.py) runs the schedule; after every unit visit it
calls each hook's `after_unit`, in order: the held-out pick first (so that
what it keeps is what gets saved), then progress, the caller's callback and
the checkpoint. A hook is any object with these methods; `Hook` has no-op
defaults to subclass.
"""
from __future__ import annotations

from typing import Callable, Optional

from tqdm.auto import tqdm

from evolq_jax.search import checkpoint as ckpt
from evolq_jax.search import selection
from evolq_jax.search.state import Run


class Hook:
  def start(self, run: Run, schedule: list, per_unit: int) -> None:
    """Before the first unit visit (of this part, when resumed)."""

  def before_unit(self, run: Run, p: int, unit: int) -> None:
    """Before visiting `unit` in pass p."""

  def on_generation(self, run: Run, record: dict) -> None:
    """After each generation (or reconstruction chunk) of a unit."""

  def after_unit(self, run: Run, p: int, unit: int, pass_end: bool) -> None:
    """After the visit; run.state holds its records. pass_end: the pass's last unit."""

  def end(self, run: Run) -> None:
    """After the last unit visit."""


class HoldoutPick(Hook):
  """After every pass: score the quantized model on held-out training images
  and keep the pass `rule` picks (selection.py) in run.selected; the search
  itself goes on from its last pass."""

  def __init__(self, scorer: Callable, holdout, alpha: float, rule: str):
    self.correct = lambda qparams: scorer(qparams, holdout)  # bool per held-out image
    self.alpha, self.rule = alpha, rule

  def start(self, run, schedule, per_unit):
    self.init_correct = self.correct(run.init)
    if not run.state.holdout:
      run.state.holdout = [selection.pass_record(0, self.init_correct, self.init_correct,
                                                 run.state.fitness_init)]

  def after_unit(self, run, p, unit, pass_end):
    if not pass_end:
      return
    s = run.state
    s.holdout.append(selection.pass_record(p + 1, self.correct(run.qparams), self.init_correct,
                                           s.history[-1]["best"]))
    pick = selection.pick(s.holdout, self.alpha, self.rule)
    if pick != s.selected_pass:
      run.selected = run.qparams if pick == p + 1 else run.init
      s.selected_pass = pick


class Progress(Hook):
  """A tqdm bar over the schedule's generations, with the best loss, and a
  line per pass with its held-out top-1 when there is a held-out pick."""

  def __init__(self, n_passes: int, enabled: bool = True):
    self.n_passes, self.enabled = n_passes, enabled

  def start(self, run, schedule, per_unit):
    self.bar = tqdm(total=len(schedule) * per_unit, initial=run.state.position * per_unit,
                    disable=not self.enabled, desc="search")

  def before_unit(self, run, p, unit):
    self.bar.set_description(f"pass {p + 1}/{self.n_passes} unit {unit}")

  def on_generation(self, run, record):
    self.bar.update(1)
    self.bar.set_postfix({k: f"{record[k]:.4f}" for k in ("best", "rec_loss") if k in record})

  def after_unit(self, run, p, unit, pass_end):
    if pass_end and run.state.holdout and self.enabled:
      self.bar.write(f"pass {p + 1}: held-out top-1 {run.state.holdout[-1]['holdout_top1']:.2f} "
                     f"(selected: pass {run.state.selected_pass})")

  def end(self, run):
    self.bar.close()


class OnUnit(Hook):
  """The caller's callback(qparams, record) after every unit, record =
  {pass, unit, candidates, fitness} (e.g. for a budget curve)."""

  def __init__(self, fn: Callable):
    self.fn = fn

  def after_unit(self, run, p, unit, pass_end):
    self.fn(run.qparams, {"pass": p, "unit": unit, "candidates": run.state.candidates,
                          "fitness": run.state.history[-1]["best"]})


class Checkpoints(Hook):
  """An orbax checkpoint in `workdir` after every unit (search/checkpoint.py):
  the QParams, the held-out pick's and the state, with the seconds so far."""

  def __init__(self, workdir: str):
    self.workdir = workdir

  def after_unit(self, run, p, unit, pass_end):
    ckpt.save(self.workdir, run.qparams, {**run.state.to_json(), "elapsed": run.seconds()},
              run.selected)


def default_hooks(scorer, holdout, alpha: float, rule: str, n_passes: int, progress: bool,
                  on_unit: Optional[Callable], workdir: Optional[str]) -> list:
  """The hooks `search` runs, in their order."""
  hooks = [HoldoutPick(scorer, holdout, alpha, rule)] if holdout is not None else []
  hooks.append(Progress(n_passes, progress))
  if on_unit:
    hooks.append(OnUnit(on_unit))
  if workdir:
    hooks.append(Checkpoints(workdir))
  return hooks
