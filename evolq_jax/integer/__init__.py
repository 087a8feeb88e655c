"""Integer inference from the one model definition: the family's module in
"int" mode (model.py) walked equation by equation (walk.py) either in JAX on
integer kernels (interpret.py, runtime.py, the portable jax.export artifact
in artifact.py) or into a QDQ ONNX graph (to_onnx.py)."""
from evolq_jax.integer.interpret import int_conv, int_dot
from evolq_jax.integer.runtime import int_forward, int_logits
