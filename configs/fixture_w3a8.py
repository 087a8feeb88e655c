"""The bundled Fashion-MNIST ViT fixture at W3A8 (FQ-ViT layout, reference observers)."""
from evolq_jax.config import bits_config


def get_config(arg=None):
  return bits_config("W3A8", "vit_fixture_patch4_28")
