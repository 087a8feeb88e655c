"""What a forward costs, for any registered family, read off the model itself:
per-layer multiply-accumulates (the BOPs of a bit-width assignment: weight
bits x activation bits x MACs) and the matmul/convolution FLOPs of each unit,
the stem and the head (the benchmarks' fraction of peak).

Nothing here runs the model: shapes come from abstract evaluation, the
counts from the traced program's dot_general / conv_general_dilated
equations (attention's q@k^T and probs@v included, elementwise work not).
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from evolq_jax.models.forward import init_params, model_for, units


def _abstract(cfg):
  params = jax.eval_shape(init_params, cfg, jax.random.key(0))
  images = jax.ShapeDtypeStruct((1, cfg.img_size, cfg.img_size, cfg.in_chans), jnp.float32)
  return params, images


@functools.lru_cache(maxsize=None)
def layer_macs(cfg) -> dict:
  """{layer path (tuple of names): multiply-accumulates per image} of every
  Dense and Conv of the model (depthwise and grouped convs by their own kernel)."""
  params, images = _abstract(cfg)
  found = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == "__call__" and "kernel" in module.variables.get("params", {}):
      kernel = module.variables["params"]["kernel"]
      positions = math.prod(out.shape[:-1]) // out.shape[0]  # per image
      found[tuple(module.path)] = positions * math.prod(kernel.shape)
    return out

  def run(p, x):
    with nn.intercept_methods(record):
      return model_for(cfg).apply({"params": p}, x)
  jax.eval_shape(run, params, images)
  return found


def _matmul_flops(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    out = eqn.outvars[0].aval.shape
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(out) * math.prod(lhs[i] for i in contract)
    elif eqn.primitive.name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
      total += 2 * math.prod(out) * (math.prod(rhs) // out_features)
    for value in eqn.params.values():  # jit / custom_jvp bodies
      for sub in (value if isinstance(value, (tuple, list)) else (value,)):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += _matmul_flops(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += _matmul_flops(sub)
  return total


def _flops(fn, *args):
  """-> (matmul/conv FLOPs of fn(*args), the abstract output): one trace."""
  closed, out = jax.make_jaxpr(fn, return_shape=True)(*args)
  return _matmul_flops(closed.jaxpr), out


def _forward(cfg, p, x, **kw):
  """The FP forward as an export traces it (named_ops): a depthwise conv is one
  grouped convolution there, so that it counts, not a sum of shifted products."""
  return model_for(cfg, "fp", None, named_ops=True).apply({"params": p}, x, **kw)


@functools.lru_cache(maxsize=None)
def forward_cost(cfg) -> dict:
  """Matmul/conv FLOPs per image: {"stem": before unit 0, "units": (one per unit),
  "head": after the last unit}. Their sum is the whole forward's."""
  params, images = _abstract(cfg)
  n = len(units(cfg))
  stem, x = _flops(lambda p, x: _forward(cfg, p, x, last_unit=0), params, images)
  per_unit, x = [], images  # unit 0 takes images: its count includes the stem's, taken off
  for b in range(n):
    flops, x = _flops(lambda p, x, b=b: _forward(cfg, p, x, first_unit=b, last_unit=b + 1),
                      params, x)
    per_unit.append(flops - (stem if b == 0 else 0))
  head = _flops(lambda p, x: _forward(cfg, p, x, first_unit=n), params, x)[0] if n else 0
  return {"stem": stem, "units": tuple(per_unit), "head": head}


def forward_flops(cfg, first_unit: int = 0) -> int:
  """Matmul/conv FLOPs per image of the forward from unit `first_unit` (its
  prefix activations given; 0: from images, the stem included) to the logits."""
  c = forward_cost(cfg)
  return (c["stem"] if first_unit == 0 else 0) + sum(c["units"][first_unit:]) + c["head"]
