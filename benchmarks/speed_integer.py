"""Mode (f) of speed.py: inference in images per second, three ways, one model:
  fp32        the float forward (models.fp_logits);
  fake-quant  the quantized forward as the search scores it (weights fake-quantized
              once beforehand, activations fake-quantized at every point);
  integer     the exported integer model (evolq_jax.integer: int8 x int8 -> int32
              dot_general for every linear layer and the attention matmuls).
Plus a 2048^2 matmul in int8 (-> int32) and in fp32, to show whether XLA's CPU
backend has a fast int8 path at all.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from evolq_jax.calibrate import calibrate
from evolq_jax.config import QuantConfig
from evolq_jax.export import build_export
from evolq_jax.integer import int_forward
from evolq_jax.models import fp_logits, model_for, quantize_params

INT_QCFG = QuantConfig(w_bits=8, a_bits=8, a_observer="minmax")


def images_per_second(fn, batches, reps: int) -> dict:
  """Compile + warm up on the first batch, then the best of `reps` passes over all batches."""
  t = time.perf_counter()
  jax.block_until_ready(fn(batches[0]))
  first = time.perf_counter() - t
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    for b in batches:
      jax.block_until_ready(fn(b))
    best = min(best, time.perf_counter() - t)
  n = sum(len(b) for b in batches)
  return {"images_per_second": n / best, "seconds": best, "images": n,
          "first_call_s": first}


def matmul_int8_vs_fp32(n: int = 2048, reps: int = 5) -> dict:
  a8 = jax.random.randint(jax.random.key(0), (n, n), -128, 128, jnp.int32).astype(jnp.int8)
  af = a8.astype(jnp.float32)
  dot8 = jax.jit(lambda x, y: lax.dot_general(x, y, (((1,), (0,)), ((), ())),
                                              preferred_element_type=jnp.int32))
  dotf = jax.jit(lambda x, y: x @ y)
  out = {}
  for name, fn, x in (("int8_gop_s", dot8, a8), ("fp32_gflop_s", dotf, af)):
    fn(x, x).block_until_ready()
    best = float("inf")
    for _ in range(reps):
      t = time.perf_counter()
      fn(x, x).block_until_ready()
      best = min(best, time.perf_counter() - t)
    out[name] = 2 * n ** 3 / best / 1e9
  out["int8_over_fp32"] = out["int8_gop_s"] / out["fp32_gflop_s"]
  return out


def run_integer_modes(cfg, params, n_images, batch, reps, log, qcfg=INT_QCFG) -> dict:
  """Random images (speed does not depend on them); 64 of them calibrate."""
  if n_images % batch:
    raise ValueError(f"--int-images={n_images} is not a multiple of --int-batch={batch}.")
  images = np.asarray(jax.random.normal(jax.random.key(2), (n_images, cfg.img_size,
                                                            cfg.img_size, cfg.in_chans)))
  n_cal = min(64, n_images)
  qparams = calibrate(cfg, qcfg, params, images[:n_cal], batch_size=n_cal, progress=False)
  export = build_export(cfg, qcfg, params, qparams)
  int_fwd = jax.jit(int_forward(export, batch)[0])
  fq_params = quantize_params(qcfg, params, qparams)
  quant = model_for(cfg, "quant", qcfg)
  fp = jax.jit(lambda p, x: fp_logits(cfg, p, x))
  fq = jax.jit(lambda p, a, x: quant.apply({"params": p}, x, a))
  split = lambda a: [jnp.asarray(a[i:i + batch]) for i in range(0, n_images, batch)]  # noqa: E731
  xs = split(images)
  out = {"setting": qcfg.name, "batch": batch,
         "fp32": images_per_second(lambda x: fp(params, x), xs, reps),
         "fake_quant": images_per_second(lambda x: fq(fq_params, qparams.acts, x), xs, reps),
         "integer": images_per_second(int_fwd, xs, reps)}
  ips = {k: out[k]["images_per_second"] for k in ("fp32", "fake_quant", "integer")}
  out["int8_vs_fp32"] = ips["integer"] / ips["fp32"]
  out["int8_vs_fake_quant"] = ips["integer"] / ips["fake_quant"]
  log(f"(f) {cfg.name}: fp32 {ips['fp32']:.1f}, fake-quant {ips['fake_quant']:.1f}, integer "
      f"{ips['integer']:.1f} images/s")
  return out
