"""What the search loop carries from unit to unit, typed.

`EngineState` is the part a checkpoint stores (as JSON, beside the QParams);
`Run` adds the QParams the loop works on and those the held-out pick keeps.
Hooks (search/hooks.py) read and update a `Run` after every unit.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional


@dataclasses.dataclass
class EngineState:
  """position: unit visits done (the schedule's index of the next one).
  history: one record per generation (or reconstruction), each with its pass,
    unit, best loss so far and the candidates evaluated up to it.
  candidates: evaluations so far. elapsed: seconds of earlier, interrupted parts.
  fitness_init: the start's calibration loss. holdout: per pass (init first) the
    held-out record (selection.pass_record); selected_pass: the pass it keeps.
  optimizer: {unit: a gradient method's optimizer state at the end of its last
    visit} (search.carry_optimizer)."""
  position: int = 0
  history: list = dataclasses.field(default_factory=list)
  candidates: int = 0
  elapsed: float = 0.0
  fitness_init: Optional[float] = None
  holdout: list = dataclasses.field(default_factory=list)
  selected_pass: int = 0
  optimizer: dict = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> "EngineState":
    """From a checkpoint's JSON, also one an older version wrote: missing fields
    take their defaults, and history records that name the unit `block` are
    renamed."""
    names = {f.name for f in dataclasses.fields(cls)}
    state = cls(**{k: v for k, v in d.items() if k in names})
    state.history = [_renamed(r) for r in state.history]
    return state


def _renamed(record: dict) -> dict:
  if "block" not in record:
    return record
  return {("unit" if k == "block" else k): v for k, v in record.items()}


@dataclasses.dataclass
class Run:
  """The loop's working set. qparams: where the search stands (it always goes
  on from the last unit); selected: what the held-out pick keeps so far (the
  result when there is a held-out split); init: the start."""
  qparams: object
  selected: object
  init: object
  state: EngineState
  began: float = dataclasses.field(default_factory=time.time)

  def seconds(self) -> float:
    """This run's seconds, its interrupted earlier parts included."""
    return self.state.elapsed + time.time() - self.began
