"""A timm model on ImageNet: arg = "MODEL[,BITS]" or "model=MODEL,bits=BITS", e.g.
configs/imagenet.py:deit_small,W4A8 (BITS default W8A8).

MODEL is a preset name (evolq_jax.models.PRESETS) or its short form: deit_tiny,
deit_small, deit_base, vit_base, swin_tiny, swin_small, swin_base, levit_128s,
levit_128, levit_192, levit_256, levit_384.

Needs a checkpoint (timm .safetensors or .pth; Swin's original release .pth, weights
under 'model', converts too) and ImageNet prepared for tfds, e.g.
  --set checkpoint=/path/deit_small_patch16_224.safetensors data.data_dir=/path/tfds
or an image folder: --set data.source=image_folder data.dir=/path/imagenet
(with train/ and the test split folder named by data.test_split, default validation).
"""
from evolq_jax.config import imagenet_config
from evolq_jax.models import PRESETS


def preset_name(short: str) -> str:
  """'deit_small' -> 'deit_small_patch16_224'; a full preset name stays."""
  if short in PRESETS:
    return short
  matches = sorted(n for n in PRESETS if n.startswith(short + "_"))
  if len(matches) != 1:
    raise ValueError(f"configs/imagenet.py: model {short!r} is " + (
        f"ambiguous ({', '.join(matches)})" if matches else "unknown")
        + f": expected a preset name or its short form, one of {sorted(PRESETS)}.")
  return matches[0]


def get_config(arg="deit_tiny"):
  fields = {"model": None, "bits": "W8A8"}
  for i, part in enumerate(p.strip() for p in arg.split(",")):
    key, sep, value = part.partition("=")
    if not sep:  # positional: MODEL, then BITS
      key, value = ("model", "bits")[min(i, 1)], part
    if key not in fields:
      raise ValueError(f"configs/imagenet.py:{arg}: {key!r} is unknown: expected "
                       "MODEL[,BITS] or model=MODEL,bits=BITS (e.g. deit_small,W4A8).")
    fields[key] = value
  return imagenet_config(fields["bits"], preset_name(fields["model"]))
