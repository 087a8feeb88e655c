"""Run configuration (ml_collections): every option of a run with its
default, generated from the dataclasses that own them (QuantConfig,
SearchConfig), config files and `--set` overrides."""
from __future__ import annotations

import dataclasses

from evolq_jax.models import get_preset, resolve_quant
from evolq_jax.quant.recipe import QuantConfig, parse_bits
from evolq_jax.search.bits import BitsConfig
from evolq_jax.search.settings import RENAMED, SearchConfig

# --- Run configuration (ml_collections) ------------------------------------

def base_config():
  """Every option of a run, with its default. Config files override a few."""
  import ml_collections
  c = ml_collections.ConfigDict()
  c.model = "vit_fixture_patch4_28"
  c.checkpoint = "bundled"  # "bundled" | path to .safetensors (Flax or timm) | "random"
  c.data = ml_collections.ConfigDict(dict(
      source="bundled", dir="", name="imagenet2012", data_dir="", train_split="train",
      test_split="validation", limit=0))
  c.calib = ml_collections.ConfigDict(dict(num_images=1000, batch_size=100, seed=0))
  # Held-out training images (not calibration) on which `rule` picks among the
  # search's passes, the init counting as pass 0; num_images 0 = keep the last
  # pass. last_unless_worse: the last pass, unless a one-sided sign test on the
  # images it and the init disagree on says it is worse (p < alpha; then the
  # init). best_significant: the best pass whose gain passes the test, else the
  # init. alpha 1.0 = no test. (search/selection.py; evidence: pick_study.md.)
  c.holdout = ml_collections.ConfigDict(dict(num_images=0, alpha=0.05,
                                             rule="last_unless_worse"))
  c.quant = _defaults(QuantConfig)
  c.eval = ml_collections.ConfigDict(dict(batch_size=500, limit=0))
  c.search = _defaults(SearchConfig)
  # per-layer weight bits under a budget, chosen before the search (search/bits.py)
  c.bits = _defaults(BitsConfig)
  c.seed = 0
  return c


def _defaults(cls):
  """A dataclass's fields and defaults as a ConfigDict (one source of truth)."""
  import ml_collections
  return ml_collections.ConfigDict({f.name: f.default for f in dataclasses.fields(cls)})


def quant_config(c) -> QuantConfig:
  """The run's QuantConfig, resolved for its model (keep_ends_8bit's layers)."""
  qcfg = QuantConfig(**c.quant.to_dict())
  return resolve_quant(get_preset(c.model), qcfg) if qcfg.keep_ends_8bit else qcfg


def search_config(c) -> SearchConfig:
  return SearchConfig(**c.search.to_dict())


def mixed_bits_config(c) -> BitsConfig:
  """The run's bits.* section (c.bits; runs recorded before it have none: off)."""
  if "bits" not in c:
    return BitsConfig()
  return BitsConfig(**c.bits.to_dict())


def load_config(spec: str):
  """'path/to/file.py[:arg]' -> ConfigDict from the file's get_config([arg])."""
  import importlib.util
  import inspect
  import os
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} does not exist (see configs/ for examples).")
  if not os.path.isfile(path) or not path.endswith(".py"):
    raise ValueError(f"config path {path!r} is not a Python file: expected configs/FILE.py[:arg], "
                     "e.g. configs/fixture_w3a8.py.")
  module_spec = importlib.util.spec_from_file_location("evolq_config", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ValueError(f"config file {path!r} line {e.lineno}: {e.msg}; fix the file.") from None
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} defines no get_config() function.")
  if arg and not inspect.signature(module.get_config).parameters:
    raise ValueError(f"config file {path!r} takes no argument, but ':{arg}' was given: drop it, "
                     "and change fields with --set (e.g. --set quant.w_bits=4).")
  return module.get_config(arg) if arg else module.get_config()


def config_from_dict(d: dict):
  """A config recorded as JSON (a run's run.json) -> ConfigDict, on top of
  base_config() so that the fields' types are the defaults' (JSON lists back
  to tuples); fields the defaults lack (a config file's own) are kept."""
  import ml_collections

  def fill(node, values, prefix):
    for key, value in values.items():
      if isinstance(value, dict):
        if key not in node:
          node[key] = ml_collections.ConfigDict()
        fill(node[key], value, f"{prefix}{key}.")
      elif key in node and isinstance(node[key], tuple) and isinstance(value, list):
        node[key] = tuple(value)
      else:
        try:
          node[key] = value
        except TypeError as e:
          raise ValueError(f"recorded config field {prefix}{key}={value!r} does not fit this "
                           f"version's field ({e}).") from None

  c = base_config()
  fill(c, d, "")
  return c


def run_config(workdir: str):
  """The config a run in `workdir` recorded (its run.json): what `--resume` continues."""
  import os

  from evolq_jax.workdir import RUN_FILE, read_run
  run = read_run(workdir)
  if run is None:
    raise ValueError(f"--resume: {workdir!r} holds no run ({os.path.join(workdir, RUN_FILE)} is "
                     "missing): check --workdir, or start a new run there with --config.")
  return config_from_dict(run.get("config", {}))


def _parse_value(text: str):
  import ast
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(c, overrides):
  """['quant.w_bits=4', ...] -> c with those fields set (types are checked)."""
  for item in overrides or ():
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--set {item!r}: expected key=value, e.g. --set quant.w_bits=4.")
    node = c
    parts = key.split(".")
    for p in parts[:-1]:
      if p not in node:
        raise ValueError(f"--set {item!r}: no config field {key!r}.")
      node = node[p]
    if parts[-1] not in node:
      if parts[0] == "search" and parts[-1] in RENAMED:
        raise ValueError(f"--set {item!r}: search.{parts[-1]} was renamed: use "
                         f"{RENAMED[parts[-1]]}.")
      raise ValueError(f"--set {item!r}: no config field {key!r}; known here: "
                       f"{sorted(node.keys())}.")
    try:
      node[parts[-1]] = _parse_value(value)
    except TypeError as e:
      raise ValueError(f"--set {item!r}: {e}. Expected a value of the field's type, "
                       f"like its default {node[parts[-1]]!r}.") from None
  return c


def bits_config(setting: str, model: str, **overrides):
  """base_config() for `model` at a setting like 'W4A8'; overrides are dotted keys."""
  w_bits, a_bits = parse_bits(setting)
  c = base_config()
  c.model = model
  c.quant.w_bits, c.quant.a_bits = w_bits, a_bits
  return apply_overrides(c, [f"{k}={v!r}" for k, v in overrides.items()])


def imagenet_config(setting: str, model: str):
  """A timm preset on ImageNet (tfds `imagenet2012`); the checkpoint must be set."""
  return bits_config(setting or "W8A8", model, checkpoint="", **{
      "data.source": "tfds", "data.name": "imagenet2012", "data.test_split": "validation"})
