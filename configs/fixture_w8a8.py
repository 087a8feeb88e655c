"""The bundled Fashion-MNIST ViT fixture at W8A8 (FQ-ViT layout, reference observers).

Takes no argument (the setting is the file's): change fields with --set.
"""
from evolq_jax.config import bits_config


def get_config():
  return bits_config("W8A8", "vit_fixture_patch4_28")
