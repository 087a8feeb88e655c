"""Walk a traced "int"-mode model (a ClosedJaxpr) equation by equation, for
the integer backends: the JAX integer forward (interpret.py) and the ONNX
export (to_onnx.py).

Named calls are inlined (jit, custom_jvp/vjp, closed calls) except the
quantizer marks of quant/markers.py, which go to `backend.mark` whole, and
its named float ops, which go to `backend.named_fn` where a backend has one.
Every other equation goes to `backend.op`. A backend sees its own values
only: the walker maps jaxpr variables to them.
"""
from __future__ import annotations

from typing import Any, Protocol

from jax.extend import core as jcore

from evolq_jax.quant import markers

# primitives whose sub-program is inlined, and the param that holds it
INLINE = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
          "custom_vjp_call_jaxpr": "fun_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr"}


class Backend(Protocol):
  def literal(self, value, aval) -> Any: ...
  def op(self, eqn, args: list, twin) -> list: ...
  def mark(self, kind: str, bits: int, eqn, args: list, twin) -> Any: ...


def _sub(eqn):
  """The inlined sub-program of eqn as (jaxpr, consts), or None."""
  key = INLINE.get(eqn.primitive.name)
  if key is None or key not in eqn.params:
    return None
  sub = eqn.params[key]
  if isinstance(sub, jcore.ClosedJaxpr):
    return sub.jaxpr, sub.consts
  return sub, ()


def _read(env, var, backend):
  if isinstance(var, jcore.Literal):
    return backend.literal(var.val, var.aval)
  return env[var]


def walk(jaxpr, consts, args, backend, twin=None):
  """Run `jaxpr` on backend values `args` -> backend values of its outputs.

  twin: the same program traced at another batch size (or None); its
  equations are handed to the backend beside each equation, so that it can
  tell batch-dependent shapes from fixed ones.
  """
  env = {}
  for v, c in zip(jaxpr.constvars, consts):
    env[v] = backend.literal(c, v.aval)
  for v, a in zip(jaxpr.invars, args):
    env[v] = a
  twin_eqns = twin.eqns if twin is not None else [None] * len(jaxpr.eqns)
  for eqn, teqn in zip(jaxpr.eqns, twin_eqns):
    vals = [_read(env, v, backend) for v in eqn.invars]
    jit_name = eqn.params.get("name") if eqn.primitive.name in ("jit", "pjit") else None
    mark, named = markers.parse(jit_name), markers.parse_fn(jit_name)
    sub = _sub(eqn)
    out = None
    if named is not None and hasattr(backend, "named_fn"):
      out = backend.named_fn(named[0], named[1], eqn, vals, teqn)  # None: inline it
    if out is not None:
      outs = [out]
    elif mark is not None:
      outs = [backend.mark(mark[0], mark[1], eqn, vals, teqn)]
    elif sub is not None:
      tsub = _sub(teqn)[0] if teqn is not None else None
      outs = walk(sub[0], sub[1], vals, backend, tsub)
    else:
      outs = backend.op(eqn, vals, teqn)
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
  return [_read(env, v, backend) for v in jaxpr.outvars]
