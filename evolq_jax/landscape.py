"""The loss landscape of one layer's weight scales (the paper's Fig. 1 / 3).

One layer's per-channel scales s (D,) are perturbed relatively along one or
two directions, s * (1 + a * d1 + b * d2), on a grid of (a, b). Directions:
  random: Gaussian, scaled to unit RMS, so a is the typical relative change of
          a channel's scale (filter normalization: each channel moves in
          proportion to its own magnitude);
  basis:  one output channel's scale alone (the paper's basis directions).
The grid is a population: its calibration loss is the search's own fitness
(`population_fitness`, one jitted vmapped call from cached prefix tokens), and
its test top-1 comes from one more vmapped call on a test subset.
Results are plain dicts of lists (JSON-ready); `save_landscape` writes PNG + JSON.
"""
from __future__ import annotations

import functools
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from evolq_jax.evaluate import batched
from evolq_jax.losses import batched_loss, get_loss
from evolq_jax.models.forward import quantize_params, units
from evolq_jax.search import fitness
from evolq_jax.search.space import SearchSpace, unit_scales

DIRECTIONS = ("random", "basis")
MIN_FACTOR = 1e-2  # a scale must stay positive: factors 1 + a*d are floored here


def check_target(cfg, layer: str, unit: int | None) -> int:
  """Validate the unit index and the layer name; -> the unit (None: the last one)."""
  us = units(cfg)
  unit = len(us) - 1 if unit is None else unit
  if not 0 <= unit < len(us):
    raise ValueError(f"unit {unit} is out of range: model {cfg.name!r} has searchable units "
                     f"0..{len(us) - 1}.")
  names = [l.name for l in us[unit].layers]
  if layer not in names:
    raise ValueError(f"layer {layer!r} is unknown in unit {unit} of {cfg.name!r}: expected one "
                     f"of {names}.")
  return unit


def layer_channels(cfg, params, layer: str, unit: int) -> int:
  """Output channels of one unit's layer (the length of its scale vector)."""
  path = next(l.path for l in units(cfg)[unit].layers if l.name == layer)
  for k in path:
    params = params[k]
  return params["kernel"].shape[-1]


def check_grid(direction: str, dims: int, points: int, span: float, channels=None,
               num: int | None = None) -> tuple | None:
  """Validate the grid's settings; -> the basis channels (default 0, 1) or None."""
  if direction not in DIRECTIONS:
    raise ValueError(f"direction {direction!r} is unknown: expected one of {DIRECTIONS}.")
  if dims not in (1, 2):
    raise ValueError(f"dims={dims}: expected 1 (a line) or 2 (a grid).")
  if points < 3:
    raise ValueError(f"points={points}: need at least 3 grid points per axis.")
  if not span > 0:
    raise ValueError(f"span={span}: expected a positive relative perturbation, e.g. 0.1.")
  if direction != "basis":
    return None
  channels = tuple(range(dims)) if channels is None else tuple(int(c) for c in channels)
  if len(channels) != dims or len(set(channels)) != dims:
    raise ValueError(f"channels={channels}: expected {dims} distinct channel indices "
                     f"(one per grid axis).")
  bad = [ch for ch in channels if num is not None and not 0 <= ch < num]
  if bad:
    raise ValueError(f"channel {bad[0]} is out of range: the layer has channels 0..{num - 1}.")
  return channels


def make_directions(kind: str, num: int, dims: int, key=None, channels=None):
  """-> (dims, num) directions for a layer with `num` output channels.

  random: Gaussian, the second orthogonalized against the first, each with
  unit RMS. basis: one-hot on `channels` (default 0, 1).
  """
  channels = check_grid(kind, dims, 3, 1.0, channels, num)
  if kind == "basis":
    return jnp.eye(num, dtype=jnp.float32)[jnp.asarray(channels)]
  d = jax.random.normal(jax.random.key(0) if key is None else key, (dims, num), jnp.float32)
  if dims == 2:
    d = d.at[1].add(-(d[1] @ d[0]) / (d[0] @ d[0]) * d[0])
  return d / jnp.sqrt(jnp.mean(d * d, axis=1, keepdims=True))


def grid_population(scales, dirs, alphas):
  """-> (P, D) perturbed scale vectors and (P, dims) coefficients.

  1D: P = len(alphas); 2D: P = len(alphas)**2, row-major (first axis = d1).
  """
  alphas = jnp.asarray(alphas, jnp.float32)
  if dirs.shape[0] == 1:
    coeffs = alphas[:, None]
  else:
    a, b = jnp.meshgrid(alphas, alphas, indexing="ij")
    coeffs = jnp.stack([a.ravel(), b.ravel()], axis=1)
  factor = jnp.maximum(1.0 + coeffs @ dirs, MIN_FACTOR)
  return scales[None] * factor, coeffs


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _population_logits(cfg, qcfg, unit, layout, chunk, population, params, fq_params, qparams,
                       tokens):
  """Logits (P, N, classes) of every candidate on cached prefix tokens (N, ...)."""
  def one(vec):
    return fitness.candidate_forward(cfg, qcfg, unit, layout, vec, params, fq_params,
                                     qparams)(tokens)

  p = population.shape[0]
  return jax.lax.map(one, population, batch_size=min(chunk, p) if chunk > 0 else p)


def population_logits(cfg, qcfg, unit, layout, population, params, qparams, images,
                      chunk: int = 16, batch_size: int = 250) -> np.ndarray:
  """Logits (P, N, classes) of each candidate, images in batches of `batch_size`."""
  fq = quantize_params(qcfg, params, qparams)
  batch_size = min(batch_size, len(images))

  def logits(x):
    tokens = fitness.prefix_activations(cfg, qcfg, params, qparams, x, unit, batch_size)
    return _population_logits(cfg, qcfg, unit, layout, chunk, population, params, fq, qparams,
                              tokens)
  return batched(logits, np.asarray(images), batch_size, axis=1)


def landscape(cfg, qcfg, params, qparams, calib_images, layer: str, unit: int | None = None,
              dims: int = 1, direction: str = "random", points: int = 41, span: float = 0.1,
              loss="infonce", temperature: float = 3.0, loss_batch: int = 100,
              chunk: int = 16, test=None, seed: int = 0, channels=None, fp_ref=None,
              block: int | None = None) -> dict:
  """Calibration loss (and test top-1 with `test=(images, labels)`) on a grid.

  The grid spans relative perturbations a in [-span, span] (`points` values per
  axis). `loss`: a loss name, scored by the search's own `population_fitness`;
  or a tuple of names, all computed from one forward of the grid (the first is
  the main one). `fp_ref`: the calibration set's FP logits, if already computed.
  Returns a JSON-ready dict: alphas, loss ((points,) or (points, points)),
  top1 (same shape, or None), loss_at_zero, roughness, `losses` and
  `roughness_by_loss` (every loss), and the settings. `block`: the old name of `unit`
  (warns).
  """
  if block is not None:
    warnings.warn("landscape(block=...) is now landscape(unit=...)", DeprecationWarning,
                  stacklevel=2)
    unit = block if unit is None else unit
  unit = check_target(cfg, layer, unit)
  check_grid(direction, dims, points, span, channels)
  names = (loss,) if isinstance(loss, str) else tuple(loss)
  for name in names:
    get_loss(name)  # a clear error for an unknown loss, before any work
  if len(calib_images) < loss_batch:
    raise ValueError(f"{len(calib_images)} calibration images are fewer than one loss batch "
                     f"of {loss_batch}.")
  scales, layout = unit_scales(qparams, units(cfg)[unit], SearchSpace((layer,)))
  dirs = make_directions(direction, scales.shape[0], dims, jax.random.key(seed), channels)
  alphas = np.linspace(-span, span, points)
  population, _ = grid_population(scales, dirs, alphas)
  calib_images = jnp.asarray(calib_images)
  if fp_ref is None:
    fp_ref = fitness.reference_logits(cfg, params, calib_images)
  shape = (points,) * dims
  if len(names) == 1:
    tokens = fitness.prefix_activations(cfg, qcfg, params, qparams, calib_images, unit)
    fq = quantize_params(qcfg, params, qparams)
    grids = {names[0]: fitness.population_fitness(
        cfg, qcfg, unit, layout, names[0], temperature, loss_batch, chunk, population, params,
        fq, qparams, tokens, fp_ref)}
  else:
    q = jnp.asarray(population_logits(cfg, qcfg, unit, layout, population, params, qparams,
                                      calib_images, chunk))
    grids = {n: jax.vmap(lambda x, n=n: batched_loss(n, x, fp_ref, loss_batch, temperature))(q)
             for n in names}
  grids = {n: np.asarray(g, np.float64).reshape(shape) for n, g in grids.items()}
  losses = grids[names[0]]
  top1 = None
  if test is not None:
    logits = population_logits(cfg, qcfg, unit, layout, population, params, qparams, test[0],
                               chunk)
    top1 = (100.0 * np.mean(logits.argmax(-1) == np.asarray(test[1])[None], 1)).reshape(shape)
  mid = (points - 1) // 2 if points % 2 else None  # alpha = 0 is a grid point for odd counts
  return {
      "model": cfg.name, "setting": qcfg.name, "w_bits": qcfg.w_bits, "a_bits": qcfg.a_bits,
      "layer": layer, "unit": unit, "dims": dims, "direction": direction, "seed": seed,
      "channels": None if direction == "random" else [int(c) for c in np.argmax(dirs, 1)],
      "span": span, "points": points, "loss_name": names[0], "temperature": temperature,
      "calib_images": len(calib_images), "test_images": None if test is None else len(test[1]),
      "alphas": alphas.tolist(), "loss": losses.tolist(),
      "top1": None if top1 is None else top1.tolist(),
      "loss_at_zero": None if mid is None else float(losses[(mid,) * dims]),
      "top1_at_zero": None if mid is None or top1 is None else float(top1[(mid,) * dims]),
      "roughness": roughness(losses),
      "losses": {n: g.tolist() for n, g in grids.items()},
      "roughness_by_loss": {n: roughness(g) for n, g in grids.items()},
  }


def unit_of(record: dict) -> int:
  """The unit of a landscape record; records written before the rename say "block"."""
  return record["unit"] if "unit" in record else record["block"]


def roughness(loss) -> dict:
  """How jagged a sampled loss is, independent of its scale.

  second_difference: mean |L[i-1] - 2 L[i] + L[i+1]| / (max L - min L), over
    every axis (about 8/n^2 for a parabola on n points; O(1) for noise);
  jump: the same mean |second difference| in the loss's own units (compares
    landscapes of one loss, e.g. 3 vs 8 bits, not of different losses);
  local_minima: interior points strictly below all their grid neighbours;
  range: max L - min L (a flat curve's roughness is 0 by definition).
  """
  loss = np.asarray(loss, np.float64)
  span = float(loss.max() - loss.min())
  if span <= 0:
    return {"second_difference": 0.0, "jump": 0.0, "local_minima": 0, "range": 0.0}
  d2 = [np.abs(np.diff(loss, 2, axis=ax)).ravel() for ax in range(loss.ndim)]
  inner = tuple(slice(1, -1) for _ in range(loss.ndim))
  is_min = np.ones(loss[inner].shape, bool)
  for ax in range(loss.ndim):
    for shift in (-1, 1):
      neighbour = np.roll(loss, shift, axis=ax)[inner]
      is_min &= loss[inner] < neighbour
  jump = float(np.mean(np.concatenate(d2)))
  return {"second_difference": jump / span, "jump": jump, "local_minima": int(is_min.sum()),
          "range": span}


def plot_landscape(result: dict, path: str, title: str | None = None) -> str:
  """PNG: 1D, loss (left axis) and top-1 (right axis) vs a; 2D, heatmap(s)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  r = result
  title = title or (f"{r['model']} {r['setting']}: unit {unit_of(r)} {r['layer']}, "
                    f"{r['direction']} direction{'s' if r['dims'] == 2 else ''}")
  a = np.asarray(r["alphas"])
  loss = np.asarray(r["loss"])
  label = f"calibration {r['loss_name']} loss"
  if r["loss_at_zero"] is not None:  # differences: readable ticks when the range is tiny
    loss = loss - r["loss_at_zero"]
    label = f"{r['loss_name']} - {r['loss_at_zero']:.5g} (its value at 0)"
  top1 = None if r["top1"] is None else np.asarray(r["top1"])
  if r["dims"] == 1:
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(a, loss, ".-", color="C0", lw=1.2, ms=3)
    ax.set_xlabel("relative perturbation a  (scale x (1 + a d))")
    ax.set_ylabel(label, color="C0")
    ax.axvline(0, color="0.7", lw=0.8, zorder=0)
    if top1 is not None:
      ax2 = ax.twinx()
      ax2.plot(a, top1, ".-", color="C1", lw=1.0, ms=3)
      ax2.set_ylabel(f"test top-1 % ({r['test_images']} images)", color="C1")
    ax.grid(alpha=0.3)
  else:
    panels = [(loss, f"calibration {label}", "viridis")]
    if top1 is not None:
      panels.append((top1, f"test top-1 % ({r['test_images']} images)", "magma"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), dpi=120,
                             squeeze=False)
    ext = [a[0], a[-1], a[0], a[-1]]
    names = [f"channel {c}" for c in r["channels"]] if r["channels"] else ["direction 1",
                                                                           "direction 2"]
    for ax, (z, label, cmap) in zip(axes[0], panels):
      im = ax.imshow(z.T, origin="lower", extent=ext, cmap=cmap, aspect="auto")
      ax.plot([0], [0], "w+", ms=10)
      ax.set_xlabel(f"a ({names[0]})")
      ax.set_ylabel(f"b ({names[1]})")
      ax.set_title(label, fontsize=9)
      fig.colorbar(im, ax=ax)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def save_landscape(result: dict, workdir: str, stem: str = "landscape") -> dict:
  """Write WORKDIR/STEM.json and STEM.png; -> their paths."""
  os.makedirs(workdir, exist_ok=True)
  paths = {"json": os.path.join(workdir, f"{stem}.json"),
           "png": os.path.join(workdir, f"{stem}.png")}
  with open(paths["json"], "w") as f:
    json.dump(result, f, indent=1)
  plot_landscape(result, paths["png"])
  return paths
