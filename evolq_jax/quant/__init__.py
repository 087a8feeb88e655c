"""Pure quantizers: bit specs, uniform fake-quant, observers, PTF, log2."""
from evolq_jax.quant.bits import BitSpec, sint, uint
from evolq_jax.quant.log2 import log2_fake_quant
from evolq_jax.quant.observers import OBSERVERS, check_observer, finalize, init_state, observe, update
from evolq_jax.quant.ptf import ptf_qparams
from evolq_jax.quant.uniform import (dequantize, fake_quant, fake_quant_ste, qparams_from_range,
                                     quantize)
from evolq_jax.quant.weights import bias_correct, calibrate_weights, kernel_paths, quantize_weights
