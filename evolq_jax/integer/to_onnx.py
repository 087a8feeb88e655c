"""QDQ ONNX from the family's own "int"-mode program (integer/model.py):
the same walk as the JAX integer forward, with an ONNX node per equation.

  - a weight mark becomes an int8 (or uint8, 8-bit asymmetric grids)
    initializer with per-output-channel scales and zero points and a
    `DequantizeLinear` on its channel axis, laid out for the op that reads
    it (MatMul: (K, N), axis 1; Conv: OIHW, axis 0); bias correction's mean
    term becomes a float side branch (shift x the input's sum over the
    contraction, one ReduceSum or one all-ones Conv);
  - an activation mark becomes `QuantizeLinear` -> `DequantizeLinear` (uint8,
    per tensor; PTF per channel on the last axis; a Clip between them for
    grids of fewer than 8 bits); the log2 quantizer becomes the float ops
    that compute it;
  - every other equation becomes the ONNX op of the same meaning; anything
    computed from constants only is folded into an initializer.
ONNX Runtime's graph optimizer then fuses DequantizeLinear -> MatMul/Conv
-> QuantizeLinear into integer kernels; which ones it fused is its business
(and is what benchmarks/deploy_speed.py profiles).

The batch size stays symbolic: the program is traced at batch 2 and 3, and a
shape that differs between the two is computed from the input's batch.
"""
from __future__ import annotations

import dataclasses
import itertools
import os

import numpy as np

from evolq_jax.export import IntExport, model_configs
from evolq_jax.integer.interpret import Kernel  # q, zero point, scale, shift; .real()
from evolq_jax.integer.model import trace
from evolq_jax.integer.walk import walk
from evolq_jax.workdir import write_atomic

OPSET = 21
INSTALL_HINT = "pip install 'evolq_jax[onnx]' (or: pip install onnx onnxruntime)"


def require_onnx():
  """-> the onnx module, or an ImportError that says what to install."""
  try:
    import onnx
  except ImportError:
    raise ImportError(f"ONNX export needs the onnx package: {INSTALL_HINT}.") from None
  return onnx


@dataclasses.dataclass
class T:
  """An ONNX tensor: its name and the shape it really has (it may still need a
  broadcast to the equation's shape: broadcast_in_dim is left to the consumer).
  qdq: (codes tensor, scale, zero point) when it is DequantizeLinear's output, so
  that shape ops and constant scalar factors move onto the codes and the
  DequantizeLinear stays right before the matmul that reads it (the QDQ pattern
  ONNX Runtime fuses)."""
  name: str
  shape: tuple
  qdq: tuple = None
  pending: str = None  # a term still to add (bias correction's), after the bias


UNARY = {"neg": "Neg", "exp": "Exp", "log": "Log", "tanh": "Tanh", "logistic": "Sigmoid",
         "sqrt": "Sqrt", "abs": "Abs", "sign": "Sign", "floor": "Floor", "ceil": "Ceil",
         "round": "Round", "erf": "Erf", "not": "Not"}
BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min",
          "pow": "Pow", "and": "And", "or": "Or", "eq": "Equal", "lt": "Less", "gt": "Greater",
          "le": "LessOrEqual", "ge": "GreaterOrEqual"}
IDENTITY = ("stop_gradient", "copy", "copy_p", "optimization_barrier")
# named ops written as one ONNX op. Not softmax: ONNX Runtime's Softmax kernel rounds
# differently enough to move several more fixture test images off the fake-quant top-1
# at every weight width (the elementwise ops it is made of move none)
NAMED_OPS = {"layernorm", "gelu", "hard_swish"}
MOVABLE = ("reshape", "transpose", "squeeze", "slice", "split", "copy", "copy_p")
REDUCE = {"reduce_sum": "ReduceSum", "reduce_max": "ReduceMax", "reduce_min": "ReduceMin",
          "reduce_prod": "ReduceProd"}


class OnnxBackend:
  def __init__(self, onnx, log2_bits: int = 4):
    self.onnx, self.h, self.log2_bits = onnx, onnx.helper, log2_bits
    self.nodes, self.inits, self._ids = [], [], itertools.count()
    self.batch = None  # int64 (1,): the input's batch size

  # --- graph building --------------------------------------------------------------

  def fresh(self, hint: str = "t") -> str:
    return f"{hint}_{next(self._ids)}"

  def const(self, value, hint: str = "c") -> str:
    name = self.fresh(hint)
    self.inits.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
    return name

  def node(self, op: str, inputs, hint: str = None, **attrs) -> str:
    out = self.fresh(hint or op.lower())
    self.nodes.append(self.h.make_node(op, list(inputs), [out], **attrs))
    return out

  def name_of(self, v) -> str:
    if isinstance(v, T):
      return v.name
    if isinstance(v, Kernel):
      return self.const(np.asarray(v.real(), np.float32), "w")
    return self.const(v)

  def shape_tensor(self, shape, twin_shape, reshape: bool = False) -> str:
    """An int64 shape tensor; dims that differ in the twin trace scale with the batch."""
    dyn = [i for i, (a, b) in enumerate(zip(shape, twin_shape)) if a != b]
    if not dyn:
      return self.const(np.asarray(shape, np.int64), "shape")
    if len(dyn) == 1 and reshape:  # Reshape infers the one batch-dependent dim
      return self.const(np.asarray([-1 if i in dyn else d for i, d in enumerate(shape)],
                                   np.int64), "shape")
    parts = []
    for i, d in enumerate(shape):
      if i in dyn:  # traced at batch 2 and 3: d = coef * batch
        coef = self.const(np.asarray([twin_shape[i] - d], np.int64))
        parts.append(self.node("Mul", [self.batch, coef], "dim"))
      else:
        parts.append(self.const(np.asarray([d], np.int64)))
    return self.node("Concat", parts, "shape", axis=0)

  def full(self, v, shape, twin_shape) -> str:
    """v broadcast to the equation's shape (an Expand where broadcast_in_dim left it short)."""
    if isinstance(v, T) and tuple(v.shape) != tuple(shape):
      return self.node("Expand", [v.name, self.shape_tensor(shape, twin_shape)])
    if not isinstance(v, T) and not isinstance(v, Kernel):
      return self.const(np.broadcast_to(np.asarray(v), shape).copy())
    return self.name_of(v)

  def full_in(self, v, i: int) -> str:
    """v broadcast to the shape of the current equation's input i."""
    shape = tuple(self._eqn.invars[i].aval.shape)
    twin = tuple(self._twin.invars[i].aval.shape) if self._twin is not None else shape
    return self.full(v, shape, twin)

  # --- the walker's interface ----------------------------------------------------------

  def literal(self, value, aval):
    return np.asarray(value, dtype=aval.dtype)

  def mark(self, kind, bits, eqn, args, twin):
    if kind == "wdq":
      return Kernel(*[np.asarray(a) for a in args])
    x = self.settle(args[0])
    shape = tuple(eqn.outvars[0].aval.shape)
    if not isinstance(x, T):  # a quantized constant (Swin's bias table): fold it
      return np.asarray(eqn.primitive.bind(*args, **eqn.params)[0])  # jit: a list of outputs
    if kind == "log2":
      return T(self.log2(self.name_of(x)), getattr(x, "shape", shape))
    scale, zp = np.asarray(args[1], np.float32), np.asarray(args[2])
    if not np.array_equal(zp, np.round(zp)):
      raise ValueError(f"activation zero point {zp} is not an integer: QDQ needs integer zero "
                       "points, as calibrate produces.")
    x = self.name_of(x)
    if scale.ndim:  # PTF: per channel, which ORT's integer kernels do not take as an input:
      # x / s_c on a unit grid, then * s_c (the same rounding as a per-axis QDQ pair)
      s_c = self.const(scale.reshape(-1), "ptf_scale")
      unit = self.qdq(self.node("Div", [x, s_c]), np.float32(1.0), zp.reshape(-1)[0], bits)
      return T(self.node("Mul", [unit.name, s_c]), args[0].shape)
    return self.qdq(x, scale, zp, bits, args[0].shape)

  def qdq(self, x: str, scale, zp, bits: int, shape=()) -> T:
    """QuantizeLinear -> DequantizeLinear (uint8, per tensor) of `bits` bits."""
    z_name = self.const(np.uint8(zp), "zp")
    u = self.node("QuantizeLinear", [x, self.const(np.float32(scale), "scale"), z_name], "q")
    if bits < 8:  # QuantizeLinear saturates at 255: clip onto the narrower grid
      u = self.node("Clip", [u, self.const(np.uint8(0)), self.const(np.uint8(2 ** bits - 1))])
    return self.dq(u, np.float32(scale), z_name, shape)

  def dq(self, u: str, scale, z_name: str, shape) -> T:
    y = self.node("DequantizeLinear", [u, self.const(np.float32(scale), "scale"), z_name], "dq")
    return T(y, shape, (u, np.float32(scale), z_name))

  def moved_qdq(self, fn, eqn, args, shape, tshape):
    """A shape op (or a constant scalar factor) applied to the codes of a DequantizeLinear
    output, and a new DequantizeLinear after it; None where that does not apply."""
    x = args[0] if args else None
    name = eqn.primitive.name
    if name == "mul" and len(args) == 2:
      t, c = (args[0], args[1]) if isinstance(args[0], T) else (args[1], args[0])
      if isinstance(t, T) and t.qdq is not None and isinstance(c, np.ndarray) and c.size == 1 \
          and t.shape == shape:
        return self.dq(t.qdq[0], t.qdq[1] * np.float32(c.reshape(())), t.qdq[2], t.shape)
      return None
    if name not in MOVABLE or not isinstance(x, T) or x.qdq is None or x.shape != tuple(
        eqn.invars[0].aval.shape):
      return None
    if fn is None:  # copy
      return x
    out = fn(eqn, [T(x.qdq[0], x.shape)] + list(args[1:]), shape, tshape)
    outs = out if isinstance(out, list) else [out]
    moved = [self.dq(o.name, x.qdq[1], x.qdq[2], o.shape) for o in outs]
    return moved if isinstance(out, list) else moved[0]

  def named_fn(self, op, arg, eqn, args, twin):
    """A named float op (quant/markers.py) as its one ONNX op; None: inline it."""
    args = [self.settle(a) for a in args]
    if not isinstance(args[0], T):
      return None  # on constants: fold through the walk
    self._eqn, self._twin = eqn, twin
    if op not in NAMED_OPS:
      return None
    x = self.full_in(args[0], 0)
    shape = tuple(eqn.outvars[0].aval.shape)
    if op == "layernorm":
      scale, bias = (self.name_of(np.asarray(a, np.float32)) for a in args[1:])
      return T(self.node("LayerNormalization", [x, scale, bias], axis=-1,
                         epsilon=float(arg)), shape)
    ops = {"softmax": ("Softmax", {"axis": -1}), "gelu": ("Gelu", {}),
           "hard_swish": ("HardSwish", {})}
    if op not in ops or op not in NAMED_OPS:
      return None
    return T(self.node(ops[op][0], [x], **ops[op][1]), shape)

  def log2(self, x: str) -> str:
    """FQ-ViT's log2 quantizer (quant/log2.py) as float ops."""
    bits = self.log2_bits
    safe = self.node("Max", [x, self.const(np.float32(1e-30))])
    e = self.node("Round", [self.node("Neg", [self.node("Div", [
        self.node("Log", [safe]), self.const(np.float32(np.log(2.0)))])])])
    under = self.node("GreaterOrEqual", [e, self.const(np.float32(2 ** bits))])
    e = self.node("Clip", [e, self.const(np.float32(0)), self.const(np.float32(2 ** bits - 1))])
    p = self.node("Pow", [self.const(np.float32(2.0)), self.node("Neg", [e])])
    return self.node("Where", [under, self.const(np.float32(0.0)), p])

  def settle(self, v):
    """v with its pending term added."""
    if isinstance(v, T) and v.pending is not None:
      return T(self.node("Add", [v.name, v.pending]), v.shape)
    return v

  def op(self, eqn, args, twin):
    self._eqn, self._twin = eqn, twin
    name = eqn.primitive.name
    shape = tuple(eqn.outvars[0].aval.shape)
    tshape = tuple(twin.outvars[0].aval.shape) if twin is not None else shape
    pend = [a for a in args if isinstance(a, T) and a.pending is not None]
    if name == "add" and len(pend) == 1 and len(args) == 2:  # the bias first, then the term
      other = args[1] if args[0] is pend[0] else args[0]
      if not isinstance(other, (T, Kernel)):
        y = self.node("Add", [pend[0].name, self.name_of(other)])
        return [T(self.node("Add", [y, pend[0].pending]), _bshape(args, shape))]
    args = [self.settle(a) for a in args]
    if not any(isinstance(a, (T, Kernel)) for a in args) and shape == tshape:
      out = eqn.primitive.bind(*args, **eqn.params)  # constants only: fold
      return [np.asarray(o) for o in out] if eqn.primitive.multiple_results else [np.asarray(out)]
    k = next((a for a in args if isinstance(a, Kernel)), None)
    if k is not None and name in ("slice", "squeeze", "reshape", "convert_element_type") + IDENTITY:
      q = k.q if name == "convert_element_type" else np.asarray(
          eqn.primitive.bind(k.q, **eqn.params))
      if q.shape[-1] == k.q.shape[-1]:
        return [Kernel(q, k.zero_point, k.scale, k.shift)]
    fn = getattr(self, f"op_{name}", None)
    moved = self.moved_qdq(fn, eqn, args, shape, tshape)
    if moved is not None:
      return moved if isinstance(moved, list) else [moved]
    if fn is not None:
      out = fn(eqn, args, shape, tshape)
      return out if isinstance(out, list) else [out]
    if name in UNARY:
      return [T(self.node(UNARY[name], [self.name_of(args[0])]), args[0].shape)]
    if name in BINARY:
      return [T(self.node(BINARY[name], [self.name_of(a) for a in args]),
                _bshape(args, shape))]
    if name in IDENTITY:
      return [args[0]]
    if name in REDUCE:
      axes = self.const(np.asarray(eqn.params["axes"], np.int64), "axes")
      x = self.full_in(args[0], 0)
      return [T(self.node(REDUCE[name], [x, axes], keepdims=0), shape)]
    raise NotImplementedError(
        f"ONNX export: the primitive {name!r} has no ONNX mapping yet (in "
        f"{eqn}); add one to evolq_jax/integer/to_onnx.py.")

  # --- ops with their own rules ------------------------------------------------------

  def op_convert_element_type(self, eqn, args, shape, tshape):
    dtype = np.dtype(eqn.params["new_dtype"])
    if dtype == np.dtype(eqn.invars[0].aval.dtype):
      return args[0]
    to = self.onnx.helper.np_dtype_to_tensor_dtype(dtype)
    return T(self.node("Cast", [self.name_of(args[0])], to=to), args[0].shape)

  def op_rsqrt(self, eqn, args, shape, tshape):
    return T(self.node("Reciprocal", [self.node("Sqrt", [self.name_of(args[0])])]), args[0].shape)

  def op_erfc(self, eqn, args, shape, tshape):
    erf = self.node("Erf", [self.name_of(args[0])])
    return T(self.node("Sub", [self.const(np.float32(1.0)), erf]), args[0].shape)

  def op_square(self, eqn, args, shape, tshape):
    x = self.name_of(args[0])
    return T(self.node("Mul", [x, x]), args[0].shape)

  def op_integer_pow(self, eqn, args, shape, tshape):
    y = self.const(np.asarray(eqn.params["y"], np.float32))
    return T(self.node("Pow", [self.name_of(args[0]), y]), args[0].shape)

  def op_exp2(self, eqn, args, shape, tshape):
    return T(self.node("Pow", [self.const(np.float32(2.0)), self.name_of(args[0])]),
             args[0].shape)

  def op_select_n(self, eqn, args, shape, tshape):
    if len(args) != 3:
      raise NotImplementedError("ONNX export: select_n with more than two cases.")
    pred = self.name_of(args[0])
    if np.dtype(eqn.invars[0].aval.dtype) != np.bool_:
      pred = self.node("Cast", [pred], to=self.onnx.TensorProto.BOOL)
    return T(self.node("Where", [pred, self.name_of(args[2]), self.name_of(args[1])]),
             _bshape(args, shape))

  def op_clamp(self, eqn, args, shape, tshape):
    lo, x, hi = (self.name_of(a) for a in args)
    return T(self.node("Min", [self.node("Max", [x, lo]), hi]), _bshape(args, shape))

  def op_reshape(self, eqn, args, shape, tshape):
    x = self.full_in(args[0], 0)
    return T(self.node("Reshape", [x, self.shape_tensor(shape, tshape, reshape=True)]), shape)

  def op_pad(self, eqn, args, shape, tshape):
    cfg = eqn.params["padding_config"]
    if any(interior for _, _, interior in cfg) or any(lo < 0 or hi < 0 for lo, hi, _ in cfg):
      raise NotImplementedError("ONNX export: pad with interior or negative padding.")
    pads = [int(lo) for lo, _, _ in cfg] + [int(hi) for _, hi, _ in cfg]
    x = self.full_in(args[0], 0)
    value = self.name_of(np.asarray(args[1], eqn.invars[0].aval.dtype))
    return T(self.node("Pad", [x, self.const(np.asarray(pads, np.int64), "pads"), value]), shape)

  def op_squeeze(self, eqn, args, shape, tshape):
    x = self.full_in(args[0], 0)
    axes = self.const(np.asarray(eqn.params["dimensions"], np.int64), "axes")
    return T(self.node("Squeeze", [x, axes]), shape)

  def op_broadcast_in_dim(self, eqn, args, shape, tshape):
    x, dims = args[0], eqn.params["broadcast_dimensions"]

    def kept(in_shape, out_rank):  # the operand's dims in place, 1 elsewhere
      ones = [1] * out_rank
      for src, dst in enumerate(dims):
        ones[dst] = in_shape[src]
      return tuple(ones)
    ones = kept(eqn.invars[0].aval.shape, len(shape))
    tones = kept(self._twin.invars[0].aval.shape, len(shape)) if self._twin is not None else ones
    if len(eqn.invars[0].aval.shape) == len(shape):
      return T(self.name_of(x), ones)
    return T(self.node("Reshape", [self.name_of(x), self.shape_tensor(ones, tones, True)]), ones)

  def op_transpose(self, eqn, args, shape, tshape):
    x = self.full_in(args[0], 0)
    return T(self.node("Transpose", [x], perm=list(eqn.params["permutation"])), shape)

  def op_concatenate(self, eqn, args, shape, tshape):
    xs = [self.full_in(a, i) for i, a in enumerate(args)]
    return T(self.node("Concat", xs, axis=eqn.params["dimension"]), shape)

  def op_slice(self, eqn, args, shape, tshape):
    in_shape = tuple(eqn.invars[0].aval.shape)
    x = self.full_in(args[0], 0)
    strides = eqn.params["strides"] or (1,) * len(in_shape)
    axes = [i for i, (s, l, st, d) in enumerate(zip(eqn.params["start_indices"],
                                                   eqn.params["limit_indices"], strides,
                                                   in_shape))
            if not (s == 0 and l == d and st == 1)]
    if not axes:
      return T(x, shape)
    arr = lambda v: self.const(np.asarray(v, np.int64))  # noqa: E731
    return T(self.node("Slice", [x, arr([eqn.params["start_indices"][i] for i in axes]),
                                 arr([eqn.params["limit_indices"][i] for i in axes]),
                                 arr(axes), arr([strides[i] for i in axes])]), shape)

  def op_split(self, eqn, args, shape, tshape):
    x = self.full_in(args[0], 0)
    outs = [self.fresh("split") for _ in eqn.outvars]
    self.nodes.append(self.h.make_node(
        "Split", [x, self.const(np.asarray(eqn.params["sizes"], np.int64))], outs,
        axis=eqn.params["axis"]))
    return [T(o, tuple(v.aval.shape)) for o, v in zip(outs, eqn.outvars)]

  def op_dot_general(self, eqn, args, shape, tshape):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    a_aval, b_aval = eqn.invars[0].aval, eqn.invars[1].aval
    nb = len(lb)
    if tuple(lb) != tuple(range(nb)) or tuple(rb) != tuple(range(nb)) or len(lc) != 1:
      raise NotImplementedError(f"ONNX export: dot_general {eqn.params['dimension_numbers']}")
    x = self.full_in(args[0], 0)
    if lc[0] != a_aval.ndim - 1:
      perm = [d for d in range(a_aval.ndim) if d != lc[0]] + [lc[0]]
      x = self.node("Transpose", [x], perm=perm)
    w = args[1]
    if isinstance(w, Kernel):
      if nb or b_aval.ndim != 2:
        raise NotImplementedError("ONNX export: a weight kernel of more than two dims in a matmul")
      q, axis = (w.q, 1) if rc[0] == 0 else (w.q.T, 1)
      y = self.node("MatMul", [x, self.dq_weight(Kernel(q, w.zero_point, w.scale, w.shift), axis)])
      if np.any(w.shift):  # bias correction: shift * sum_k x_k
        s = self.node("ReduceSum", [x, self.const(np.asarray([-1], np.int64))], keepdims=1)
        # added after the layer's bias: MatMul -> Add(bias) is what ORT fuses
        return T(y, shape, pending=self.node("Mul", [s, self.const(w.shift.astype(np.float32))]))
      return T(y, shape)
    rfree = [d for d in range(b_aval.ndim) if d not in rc and d not in rb]
    if nb and a_aval.ndim - nb - 1 != 1 or len(rfree) != 1:
      raise NotImplementedError(f"ONNX export: dot_general {eqn.params['dimension_numbers']}")
    b = self.full_in(w, 1)
    want = list(range(nb)) + [rc[0], rfree[0]]
    if want != list(range(b_aval.ndim)):
      b = self.node("Transpose", [b], perm=want)
    return T(self.node("MatMul", [x, b]), shape)

  def dq_weight(self, k: Kernel, axis: int) -> str:
    return self.node("DequantizeLinear", [self.const(k.q, "w_q"), self.const(
        k.scale.astype(np.float32), "w_scale"), self.const(k.zero_point, "w_zp")], "w",
        axis=axis)

  def op_conv_general_dilated(self, eqn, args, shape, tshape):
    p = eqn.params
    dn = p["dimension_numbers"]
    if (dn.lhs_spec, dn.rhs_spec, dn.out_spec) != ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)) or \
        any(d != 1 for d in p["lhs_dilation"]):
      raise NotImplementedError(f"ONNX export: a convolution other than NHWC/HWIO ({dn}).")
    x = self.full_in(args[0], 0)
    x = self.node("Transpose", [x], perm=[0, 3, 1, 2])
    w = args[1]
    if isinstance(w, Kernel):
      oihw = Kernel(w.q.transpose(3, 2, 0, 1), w.zero_point, w.scale, w.shift)
      weight = self.dq_weight(oihw, 0)
    else:
      weight = self.node("Transpose", [self.name_of(w)], perm=[3, 2, 0, 1])
    (t, b), (le, r) = p["padding"]
    attrs = dict(strides=list(p["window_strides"]), pads=[t, le, b, r],
                 dilations=list(p["rhs_dilation"]), group=p["feature_group_count"])
    y = self.node("Conv", [x, weight], **attrs)
    if isinstance(w, Kernel) and np.any(w.shift):  # bias correction: shift * window sums
      kh, kw, cin, cout = w.q.shape
      g = p["feature_group_count"]
      ones = np.ones((g if g > 1 else 1, cin, kh, kw), np.float32)
      s = self.node("Conv", [x, self.const(ones, "ones")], **{**attrs, "group": g})
      shift = w.shift.astype(np.float32).reshape(1, cout, 1, 1)
      y = self.node("Add", [y, self.node("Mul", [s, self.const(shift)])])
    return T(self.node("Transpose", [y], perm=[0, 2, 3, 1]), shape)


def _bshape(args, shape):
  """The broadcast of the operands' real shapes (ONNX broadcasts like numpy)."""
  shapes = [a.shape if isinstance(a, T) else np.shape(a) for a in args]
  try:
    return tuple(np.broadcast_shapes(*shapes))
  except ValueError:
    return shape


def _live(nodes, inits, output: str):
  """The nodes the output depends on, and their initializers (the walk leaves some
  behind: a DequantizeLinear whose codes moved on, a folded constant's producer)."""
  need, keep = {output}, []
  for node in reversed(nodes):
    if any(o in need for o in node.output):
      keep.append(node)
      need.update(i for i in node.input if i)
  return keep[::-1], [i for i in inits if i.name in need]


def to_onnx(closed, twin, input_shape, num_classes: int, metadata: dict | None = None,
            log2_bits: int = 4):
  """The traced "int" program (and its twin at another batch size) -> onnx.ModelProto
  with input "images" (batch, H, W, C) float32 and output "logits" (batch, classes)."""
  onnx = require_onnx()
  be = OnnxBackend(onnx, log2_bits)
  h = onnx.helper
  shape = be.node("Shape", ["images"], "shape")
  be.batch = be.node("Slice", [shape, be.const(np.asarray([0], np.int64)),
                               be.const(np.asarray([1], np.int64))], "batch")
  out = be.settle(walk(closed.jaxpr, closed.consts, [T("images", tuple(input_shape))], be,
                      twin.jaxpr if twin is not None else None)[0])
  logits = be.full(out, closed.jaxpr.outvars[0].aval.shape, twin.jaxpr.outvars[0].aval.shape
                   if twin is not None else closed.jaxpr.outvars[0].aval.shape)
  be.nodes.append(h.make_node("Identity", [logits], ["logits"]))
  nodes, inits = _live(be.nodes, be.inits, "logits")
  graph = h.make_graph(
      nodes, "evolq_int",
      [h.make_tensor_value_info("images", onnx.TensorProto.FLOAT, ["batch"] + list(input_shape[1:]))],
      [h.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", num_classes])],
      inits)
  model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)],
                       producer_name="evolq_jax")
  model.ir_version = 10
  for k, v in (metadata or {}).items():
    entry = model.metadata_props.add()
    entry.key, entry.value = k, str(v)
  return model


def input_metadata(cfg) -> dict:
  t = cfg.transform
  return {"input": f"images: float32 (batch, {cfg.img_size}, {cfg.img_size}, {cfg.in_chans}) NHWC, "
                   f"pixels/255 normalized by mean {tuple(t['mean'])} and std {tuple(t['std'])} "
                   "(what evolq_jax.load_split returns)",
          "preprocess": cfg.preprocess, "num_classes": cfg.num_classes, "model": cfg.name}


def export_onnx(export: IntExport):
  """An integer export -> onnx.ModelProto (QDQ), from the family's "int" mode."""
  cfg, qcfg = model_configs(export.manifest)
  meta = {**input_metadata(cfg), "quant": qcfg.name,
          **{f"source.{k}": v for k, v in export.manifest.get("source", {}).items()}}
  closed, twin = trace(export, 2), trace(export, 3)  # > 1: no size-1 special cases
  if len(closed.jaxpr.eqns) != len(twin.jaxpr.eqns):
    raise RuntimeError("ONNX export: the model traces to different programs at batch 2 and 3; "
                       "its batch dimension cannot be made symbolic.")
  return to_onnx(closed, twin, (None, cfg.img_size, cfg.img_size, cfg.in_chans), cfg.num_classes,
                 meta, qcfg.prob_bits)


def fp_onnx(cfg, params):
  """The full-precision model as ONNX through the same walk (no marks: float weights, no
  Q/DQ): the graph the QDQ export is measured against."""
  import jax

  from evolq_jax.models.forward import model_for
  spec = lambda b: jax.ShapeDtypeStruct((b, cfg.img_size, cfg.img_size, cfg.in_chans),  # noqa
                                        np.float32)
  module = model_for(cfg, "fp", named_ops=True)
  fn = lambda x: module.apply({"params": params}, x)  # noqa: E731
  closed, twin = jax.make_jaxpr(fn)(spec(2)), jax.make_jaxpr(fn)(spec(3))
  return to_onnx(closed, twin, (None, cfg.img_size, cfg.img_size, cfg.in_chans), cfg.num_classes,
                 input_metadata(cfg))


def save_onnx(path: str, model) -> str:
  """Check the graph (onnx.checker) and write it atomically; -> path."""
  onnx = require_onnx()
  onnx.checker.check_model(model)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  return write_atomic(path, model.SerializeToString())
