"""Integer inference: int8 kernels (kernels.py), the per-family integer forwards
(vit.py), the runtime built from an export (runtime.py) and the portable
jax.export artifact (artifact.py)."""
from evolq_jax.integer.kernels import ActQ, IntLinear, int_matmul, linear, pixel_linear
from evolq_jax.integer.runtime import FORWARDS, forward_for, int_logits, runtime
