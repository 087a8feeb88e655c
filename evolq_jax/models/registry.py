"""Every model family, and preset lookup by name. Adding a family: its own
module under models/ plus one line here."""
from __future__ import annotations

from evolq_jax.models import efficientnet, levit, swin, vit
from evolq_jax.models.interface import Family, ModelConfig

FAMILIES: dict[str, Family] = {f.name: f for f in (vit.FAMILY, efficientnet.FAMILY, levit.FAMILY,
                                                        swin.FAMILY)}
PRESETS: dict[str, ModelConfig] = {p.name: p for f in FAMILIES.values() for p in f.presets}
_FAMILY_OF_PRESET = {p.name: f for f in FAMILIES.values() for p in f.presets}


def register_preset(cfg: ModelConfig) -> ModelConfig:
  """Make a model size of your own known by name (configs and the CLI: model=NAME).

  cfg: a config of a registered family, e.g.
  dataclasses.replace(get_preset("deit_tiny_patch16_224"), name="deit_6x256", depth=6,
  embed_dim=256, num_heads=4). Registering the same config twice is a no-op;
  another config under a taken name is an error."""
  fam = family_of(cfg)
  if PRESETS.get(cfg.name, cfg) != cfg:
    raise ValueError(f"model {cfg.name!r} is already registered with another config "
                     f"({PRESETS[cfg.name]}): give yours another name.")
  PRESETS[cfg.name] = cfg
  _FAMILY_OF_PRESET[cfg.name] = fam
  return cfg


def get_preset(name: str) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"model={name!r} is unknown: expected one of {sorted(PRESETS)}.")
  return PRESETS[name]


def family_of(cfg: ModelConfig) -> Family:
  """The family of a preset, or of a config derived from one (dataclasses.replace)."""
  if cfg.name in _FAMILY_OF_PRESET:
    return _FAMILY_OF_PRESET[cfg.name]
  for fam in FAMILIES.values():
    if any(type(cfg) is type(p) for p in fam.presets):
      return fam
  raise ValueError(f"model config {cfg.name!r} ({type(cfg).__name__}) belongs to no family: "
                   f"expected a config of one of {sorted(FAMILIES)}.")
