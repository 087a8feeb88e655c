"""The deployed model: ONNX Runtime's parity with the fake-quant model, and its
speed against fp32, side by side.

  python benchmarks/deploy.py parity [--cases fixture_W8A8 ...]   # real runs, whole test sets
  python benchmarks/deploy.py speed [--models deit_tiny ...]      # idle machine, 2 threads
  python benchmarks/deploy.py ceiling                             # idle machine, 2 threads
  python benchmarks/deploy.py report                              # deploy.md from deploy.json
  ->  benchmarks/results/deploy.json (+ docs/results/deploy.md)

parity: each case is a run (`evolq eval`, or `search` where named) in
runs/deploy/<case> (reused when finished); its result is exported as QDQ ONNX
(`evolq export --format onnx`) and as the JAX integer model, and all three
(fake-quant, ONNX Runtime, JAX integer) score every test image.
speed: ONNX Runtime int8 (the QDQ export) against ONNX Runtime fp32 (the same
graph without Q/DQ, from the same walk) against JAX fp32 and the JAX integer
forward; batch 1 (median latency over --reps1 runs) and batch 64 (images/s,
best of --reps64), 2 threads; random images (speed does not depend on values;
random weights for deit_tiny, the real ones otherwise); file sizes; ONNX
Runtime's own profile of the int8 graph at batch 64 (time per op type, and the
matmuls/convs it left in float).
ceiling: what int8 can win on this CPU at most, for deit_tiny at batch 64: ONNX
Runtime's int8 matmul (the QDQ pattern the export writes) against its fp32 matmul
at each of deit_tiny's linear shapes; the fp32 graph's matmul share of time (its
profile); the bound that follows (Amdahl: the rest of the graph gains nothing);
and the whole graph timed with the QDQ overheads taken out one by one (bias
correction off; the quantization points whose reader is not a matmul left in
float), which change the model and are measured here for speed only.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from common import RESULTS, git_commit, write_results

from evolq_jax.calibrate import calibrate
from evolq_jax.config import apply_overrides, bits_config, load_config, quant_config
from evolq_jax.deploy import CPU_FLAGS, cpu_info, export_run, has_int8_dot
from evolq_jax.evaluate import batched, percent, topk_accuracy
from evolq_jax.export import build_export, save_export
from evolq_jax.integer import int_forward, int_logits
from evolq_jax.integer.to_onnx import export_onnx, fp_onnx, save_onnx
from evolq_jax.models import fp_logits
from evolq_jax.pipeline import load_data, load_model, predict, run_eval, run_search
from evolq_jax.qparams import QPARAMS_FILE, load_qparams
from evolq_jax.quant.recipe import QuantConfig, reference_init

NAME = "deploy"
RUNS = "runs/deploy"
# case -> (command, config, overrides); Lite0 starts from the reference's init (bias
# correction): without it W4A8 keeps 13.8% top-1, not a model anyone would deploy
CASES = {
    "fixture_W8A8": ("eval", "configs/fixture_w8a8.py", []),
    "fixture_W4A8": ("eval", "configs/fixture_w4a8.py", []),
    "fixture_W3A8": ("eval", "configs/fixture_w3a8.py", []),
    "fixture_W3A8_search": ("search", "configs/fixture_w3a8.py", []),
    "cifar10_W3A4": ("eval", "configs/cifar10.py:W3A4", []),
    "lite0_W8A8": ("eval", "configs/efficientnet_lite0.py:W8A8", ["quant.bias_correction=True"]),
    "lite0_W4A8": ("eval", "configs/efficientnet_lite0.py:W4A8", ["quant.bias_correction=True"]),
}
SPEED_MODELS = {"deit_tiny": ("deit_tiny_patch16_224", "random"),
                "cifar10_vit": ("vit_cifar10_patch4_32", "bundled"),
                "lite0": ("efficientnet_lite0", "pip")}
INT_OPS = ("QLinearMatMul", "MatMulIntegerToFloat", "QLinearConv", "ConvInteger",
           "MatMulInteger", "QGemm", "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul")


def load_json() -> dict:
  path = os.path.join(RESULTS, f"{NAME}.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {}


def load_average() -> list:
  return [round(x, 2) for x in os.getloadavg()]


def session(path_or_bytes, threads: int = 2, profile: str | None = None,
            optimized: str | None = None):
  import onnxruntime as ort
  opts = ort.SessionOptions()
  opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
  if profile:
    opts.enable_profiling, opts.profile_file_prefix = True, profile
  if optimized:
    opts.optimized_model_filepath = optimized
  return ort.InferenceSession(path_or_bytes, opts, providers=["CPUExecutionProvider"])


def ort_logits(sess, images, batch: int = 100) -> np.ndarray:
  return batched(lambda x: sess.run(None, {"images": x})[0], np.asarray(images, np.float32), batch)


# --- parity --------------------------------------------------------------------------

def case_config(case: str):
  _, spec, sets = CASES[case]
  return apply_overrides(load_config(spec), sets)


def finished_run(case: str, log) -> str:
  """The case's run folder, its run done (reused when summary.json is there)."""
  kind, spec, sets = CASES[case]
  workdir = os.path.join(RUNS, case)
  if os.path.exists(os.path.join(workdir, "summary.json")) and \
      os.path.exists(os.path.join(workdir, QPARAMS_FILE)):
    return workdir
  log(f"{case}: evolq {kind} --config {spec} " + " ".join(f"--set {s}" for s in sets))
  (run_eval if kind == "eval" else run_search)(case_config(case), workdir, overwrite=True)
  return workdir


def parity_case(case: str, log) -> dict:
  workdir = finished_run(case, log)
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  c = case_config(case)
  cfg, params = load_model(c)
  images, labels = load_data(c, cfg)["test"]
  qcfg = quant_config(c)
  qparams = load_qparams(os.path.join(workdir, QPARAMS_FILE))
  start = time.time()
  onnx_path = export_run(workdir, fmt="onnx")["onnx"]
  export_s = time.time() - start
  # the fake-quant model as the run scored it (its eval batch size), and at another batch
  # size: XLA rounds a different program in float32, which moves some top-1s by itself
  fq = predict(cfg, params, images, qcfg, qparams, batch_size=c.eval.batch_size)
  other = 100 if c.eval.batch_size != 100 else 50
  fq_other = predict(cfg, params, images, qcfg, qparams, batch_size=other)
  ol = ort_logits(session(onnx_path), images)
  export = build_export(cfg, qcfg, params, qparams)
  il = int_logits(export, images, 100)
  top1 = lambda lg: topk_accuracy(lg, labels, 1)  # noqa: E731  (the runs' own metric)
  same = lambda a, b: percent(a.argmax(-1) == b.argmax(-1))  # noqa: E731
  run_top1 = summary.get("final_top1", summary["init_top1"])
  rec = {"command": f"evolq {CASES[case][0]} --config {CASES[case][1]} "
                    + " ".join(f"--set {s}" for s in CASES[case][2]),
         "model": cfg.name, "setting": qcfg.name, "bias_correction": qcfg.bias_correction,
         "test_images": int(len(images)), "run_top1": run_top1, "eval_batch": c.eval.batch_size,
         "fake_quant_top1": top1(fq), "onnx_top1": top1(ol), "jax_integer_top1": top1(il),
         "onnx_images_off_run_top1": int(round(abs(top1(ol) - run_top1) * len(images) / 100)),
         "onnx_same_top1": same(ol, fq),
         "onnx_max_abs_delta_logit": float(np.max(np.abs(ol - fq))),
         "jax_integer_same_top1": same(il, fq),
         "jax_integer_max_abs_delta_logit": float(np.max(np.abs(il - fq))),
         "fake_quant_other_batch": other, "fake_quant_other_batch_top1": top1(fq_other),
         "fake_quant_other_batch_same_top1": same(fq_other, fq),
         "onnx_bytes": os.path.getsize(onnx_path), "export_seconds": export_s,
         "points_off_by_a_step": divergence(export, images[:50])}
  log(f"{case}: ONNX Runtime top-1 {rec['onnx_top1']:.2f} (run {run_top1:.2f}), same top-1 as "
      f"fake-quant {rec['onnx_same_top1']:.2f}%, max |dlogit| {rec['onnx_max_abs_delta_logit']:.4f}")
  return rec


def divergence(export, images) -> list:
  """Per activation quantization point, in forward order: the fraction of values that
  land on another code in the exact integer walk than in the same program computed in
  float32 (what the fake-quant model does). A value on the boundary of a rounding step
  rounds either way by a float32 error; the flip moves what every later point sees."""
  from evolq_jax.integer.interpret import IntegerBackend
  from evolq_jax.integer.model import trace
  from evolq_jax.integer.walk import walk

  class Recorder(IntegerBackend):
    def __init__(self, integer: bool):
      super().__init__()
      self.integer, self.points = integer, []

    def mark(self, kind, bits, eqn, args, twin):
      out = super().mark(kind, bits, eqn, args, twin) if self.integer else \
          eqn.primitive.bind(*[self._real(a) for a in args], **eqn.params)[0]
      if kind == "qdq":
        self.points.append(np.asarray(self._real(out)))
      return out

    def op(self, eqn, args, twin):
      if self.integer:
        return super().op(eqn, args, twin)
      out = eqn.primitive.bind(*[self._real(a) for a in args], **eqn.params)
      return out if eqn.primitive.multiple_results else [out]

  closed = trace(export, len(images))
  walks = [Recorder(False), Recorder(True)]
  for w in walks:
    walk(closed.jaxpr, closed.consts, [np.asarray(images, np.float32)], w)
  return [float(np.mean(a != b)) for a, b in zip(walks[0].points, walks[1].points)]


# --- speed ---------------------------------------------------------------------------

def speed_model(key: str, tmp: str, args, log) -> dict:
  name, weights = SPEED_MODELS[key]
  ckpt = {"random": "random", "bundled": "bundled"}.get(weights)
  c = bits_config("W8A8", name, **({"checkpoint": ckpt} if ckpt else {}))
  if weights == "pip":
    c = load_config("configs/efficientnet_lite0.py:W8A8")
  cfg, params = load_model(c)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(64, cfg.img_size, cfg.img_size, cfg.in_chans)).astype(np.float32)
  qcfg = reference_init(QuantConfig(w_bits=args.w_bits, a_bits=8))
  qparams = calibrate(cfg, qcfg, params, images[:16], 16, progress=False)
  export = build_export(cfg, qcfg, params, qparams)
  paths = {"int8": save_onnx(os.path.join(tmp, f"{key}_int8.onnx"), export_onnx(export)),
           "fp32": save_onnx(os.path.join(tmp, f"{key}_fp32.onnx"), fp_onnx(cfg, params))}
  packed = save_export(os.path.join(tmp, f"{key}_int.safetensors"), export)["export"]
  sessions = {k: session(p) for k, p in paths.items()}
  jfp = jax.jit(lambda x: fp_logits(cfg, params, x))
  jint = jax.jit(int_forward(export, 64)[0])
  jint1 = jax.jit(int_forward(export, 1)[0])
  runners = {
      "ort_int8": lambda x: sessions["int8"].run(None, {"images": x})[0],
      "ort_fp32": lambda x: sessions["fp32"].run(None, {"images": x})[0],
      "jax_fp32": lambda x: np.asarray(jfp(x)),
      "jax_integer": lambda x: np.asarray((jint if len(x) == 64 else jint1)(x))}
  out = {"model": name, "weights": weights, "setting": qcfg.name, "cpu": cpu_info(),
         "load_before": load_average(),
         "bytes": {"onnx_int8": os.path.getsize(paths["int8"]),
                   "onnx_fp32": os.path.getsize(paths["fp32"]),
                   "packed_export": os.path.getsize(packed)}}
  one = images[:1]
  for k, fn in runners.items():
    fn(one), fn(images)  # warm up: compile / first-run allocations
    lat = []
    for _ in range(args.reps1):
      t = time.perf_counter()
      fn(one)
      lat.append(time.perf_counter() - t)
    thr = []
    for _ in range(args.reps64):
      t = time.perf_counter()
      fn(images)
      thr.append(time.perf_counter() - t)
    out[k] = {"b1_median_ms": 1e3 * statistics.median(lat), "b1_runs": len(lat),
              "b64_images_per_s": 64 / min(thr), "b64_runs": len(thr)}
    log(f"{key} {k}: batch 1 {out[k]['b1_median_ms']:.2f} ms, batch 64 "
        f"{out[k]['b64_images_per_s']:.1f} images/s")
  out["load_after"] = load_average()
  out["ort_int8_vs_fp32_b64"] = out["ort_int8"]["b64_images_per_s"] / out["ort_fp32"][
      "b64_images_per_s"]
  out["ort_int8_vs_fp32_b1"] = out["ort_fp32"]["b1_median_ms"] / out["ort_int8"]["b1_median_ms"]
  out["jax_integer_vs_fp32_b64"] = out["jax_integer"]["b64_images_per_s"] / out["jax_fp32"][
      "b64_images_per_s"]
  out["profile"] = profile(paths["int8"], images, tmp, key)
  return out


def profile(path: str, images, tmp: str, key: str) -> dict:
  """ORT's profile of the int8 graph at batch 64: time share per op type, and which
  matmuls/convs ran in float (not fused into integer kernels)."""
  import onnx
  optimized = os.path.join(tmp, f"{key}_opt.onnx")
  share = op_time_share(path, images, tmp, key, optimized)
  ops = collections.Counter(n.op_type for n in onnx.load(optimized).graph.node)
  return {"time_share": {k: round(v, 4) for k, v in list(share.items())[:12]},
          "integer_kernels": {k: v for k, v in ops.items() if k in INT_OPS},
          "float_matmuls_convs": {k: v for k, v in ops.items()
                                  if k in ("MatMul", "Conv", "Gemm", "FusedConv", "FusedMatMul")}}


def op_time_share(path: str, images, tmp: str, key: str, optimized: str | None = None) -> dict:
  """Each op type's share of kernel time in ONNX Runtime's profile (3 runs), largest
  first; `optimized` is where ORT writes the graph it ran."""
  sess = session(path, profile=os.path.join(tmp, f"{key}_prof"), optimized=optimized)
  for _ in range(3):
    sess.run(None, {"images": images})
  per_op = collections.Counter()
  with open(sess.end_profiling()) as f:
    trace = json.load(f)
  for ev in trace:
    if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
      per_op[ev["args"]["op_name"]] += ev["dur"]
  total = sum(per_op.values())
  return {k: v / total for k, v in per_op.most_common()}


# --- ceiling -------------------------------------------------------------------------

KERNEL_OPS = ("MatMul", "Conv", "Gemm")


def without_float_points(model):
  """The ONNX model with every Quantize/DequantizeLinear pair whose dequantized value
  feeds no matmul or convolution (nor the graph output) taken out: those values stay
  float, so ONNX Runtime runs no standalone Q/DQ pass over them. Returns (model, pairs)."""
  g = model.graph
  readers = collections.defaultdict(list)
  for n in g.node:
    for i in n.input:
      readers[i].append(n)
  maker = {o: n for n in g.node for o in n.output}
  outputs = {o.name for o in g.output}
  rename, drop = {}, set()
  for dq in g.node:
    if dq.op_type != "DequantizeLinear" or dq.output[0] in outputs:
      continue
    chain, q = [], maker.get(dq.input[0])
    while q is not None and q.op_type == "Clip":  # the clip to < 8 bits between the pair
      chain.append(q)
      q = maker.get(q.input[0])
    if q is None or q.op_type != "QuantizeLinear" or len(readers[q.output[0]]) != 1 or any(
        r.op_type in KERNEL_OPS for r in readers[dq.output[0]]):
      continue
    rename[dq.output[0]] = q.input[0]
    drop.update(id(n) for n in (dq, q, *chain))
  kept = [n for n in g.node if id(n) not in drop]
  for n in kept:
    for k, name in enumerate(n.input):
      while name in rename:
        name = rename[name]
      n.input[k] = name
  del g.node[:]
  g.node.extend(kept)
  return model, len(rename)


def best_of(runners: dict, x, reps: int) -> dict:
  """Seconds per call, best of `reps`, the runners interleaved (one round each in turn)."""
  for fn in runners.values():
    fn(x)
  best = {k: float("inf") for k in runners}
  for _ in range(reps):
    for k, fn in runners.items():
      t = time.perf_counter()
      fn(x)
      best[k] = min(best[k], time.perf_counter() - t)
  return best


def matmul_sessions(m: int, k: int, n: int, rng):
  """ONNX Runtime fp32 MatMul and the export's QDQ int8 pattern (uint8 activation per
  tensor, int8 weights per output channel, zero point 0) at one shape."""
  from onnx import TensorProto, helper, numpy_helper
  w = rng.normal(size=(k, n)).astype(np.float32)
  consts = [numpy_helper.from_array(rng.integers(-8, 8, size=(k, n)).astype(np.int8), "wq"),
            numpy_helper.from_array(np.full(n, 0.01, np.float32), "ws"),
            numpy_helper.from_array(np.zeros(n, np.int8), "wz"),
            numpy_helper.from_array(np.float32(0.05), "xs"),
            numpy_helper.from_array(np.uint8(128), "xz")]
  graphs = {"fp32": ([helper.make_node("MatMul", ["x", "w"], ["y"])],
                     [numpy_helper.from_array(w, "w")]),
            "int8": ([helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                      helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                      helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1),
                      helper.make_node("MatMul", ["xd", "wd"], ["y"])], consts)}
  out = {}
  for key, (nodes, inits) in graphs.items():
    g = helper.make_graph(nodes, key, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     [m, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                          initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    out[key] = session(model.SerializeToString())
  return out


def ceiling(tmp: str, args, log) -> dict:
  import dataclasses

  import onnx
  name = SPEED_MODELS["deit_tiny"][0]
  cfg, params = load_model(bits_config("W8A8", name, checkpoint="random"))
  rng = np.random.default_rng(0)
  images = rng.normal(size=(64, cfg.img_size, cfg.img_size, cfg.in_chans)).astype(np.float32)
  out = {"model": name, "cpu": cpu_info(), "load_before": load_average()}
  # 1. one matmul at each of deit_tiny's linear shapes (batch 64 x 197 tokens)
  rows, d, hidden = 64 * (cfg.num_patches + 1), cfg.embed_dim, cfg.mlp_hidden
  shapes = {"qkv": (d, 3 * d), "proj": (d, d), "fc1": (d, hidden), "fc2": (hidden, d)}
  out["matmuls"], fp_total, int_total = {}, 0.0, 0.0
  for layer, (k, n) in shapes.items():
    sess = matmul_sessions(rows, k, n, rng)
    x = rng.normal(size=(rows, k)).astype(np.float32)
    t = best_of({kk: (lambda v, s=s: s.run(None, {"x": v})) for kk, s in sess.items()}, x,
                args.reps64)
    out["matmuls"][layer] = {"shape": [rows, k, n], "fp32_ms": 1e3 * t["fp32"],
                             "int8_ms": 1e3 * t["int8"], "int8_vs_fp32": t["fp32"] / t["int8"]}
    fp_total, int_total = fp_total + t["fp32"], int_total + t["int8"]
    log(f"ceiling {layer} {rows}x{k}x{n}: fp32 {1e3 * t['fp32']:.1f} ms, int8 "
        f"{1e3 * t['int8']:.1f} ms")
  out["matmul_int8_vs_fp32"] = fp_total / int_total  # one of each layer: a block's mix
  # 2. the whole graph, with the QDQ overheads taken out one by one
  paths = {"fp32": save_onnx(os.path.join(tmp, "fp32.onnx"), fp_onnx(cfg, params))}
  pairs = 0
  for bc in (True, False):
    qcfg = reference_init(QuantConfig(w_bits=args.w_bits, a_bits=8))
    qcfg = dataclasses.replace(qcfg, bias_correction=bc)
    qparams = calibrate(cfg, qcfg, params, images[:16], 16, progress=False)
    tag = "int8" if bc else "int8_no_bias_correction"
    paths[tag] = save_onnx(os.path.join(tmp, f"{tag}.onnx"),
                           export_onnx(build_export(cfg, qcfg, params, qparams)))
    model, pairs = without_float_points(onnx.load(paths[tag]))
    paths[tag + "_float_points"] = os.path.join(tmp, f"{tag}_float_points.onnx")
    onnx.save(model, paths[tag + "_float_points"])
  out["float_points_taken_out"] = pairs  # as many with bias correction as without
  sessions = {k: session(p) for k, p in paths.items()}
  t = best_of({k: (lambda v, s=s: s.run(None, {"images": v})) for k, s in sessions.items()},
              images, args.reps64)
  out["graphs_b64_images_per_s"] = {k: 64 / v for k, v in t.items()}
  out["graphs_vs_fp32_b64"] = {k: t["fp32"] / v for k, v in t.items() if k != "fp32"}
  for k, v in out["graphs_vs_fp32_b64"].items():
    log(f"ceiling whole graph {k}: {v:.2f}x fp32")
  # 3. the bound: the fp32 graph's matmul share gains the matmul ratio, the rest nothing
  share = op_time_share(paths["fp32"], images, tmp, "fp32")
  m = sum(v for k, v in share.items() if "MatMul" in k or k == "Gemm")
  out["fp32_matmul_share"] = m
  out["bound_int8_vs_fp32_b64"] = 1 / ((1 - m) + m / out["matmul_int8_vs_fp32"])
  out["load_after"] = load_average()
  return out


# --- report --------------------------------------------------------------------------

def summary(payload: dict) -> dict:
  sp, pa = payload.get("speed", {}), payload.get("parity", {})
  get = lambda m, k: sp.get(m, {}).get(k)  # noqa: E731
  return {"ort_int8_vs_fp32_deit_tiny_b64": get("deit_tiny", "ort_int8_vs_fp32_b64"),
          "ort_int8_vs_fp32_deit_tiny_b1": get("deit_tiny", "ort_int8_vs_fp32_b1"),
          "ort_int8_vs_fp32_lite0_b64": get("lite0", "ort_int8_vs_fp32_b64"),
          "ort_int8_vs_fp32_cifar10_vit_b64": get("cifar10_vit", "ort_int8_vs_fp32_b64"),
          "ort_int8_matmul_vs_fp32_deit_tiny": payload.get("ceiling", {}).get(
              "matmul_int8_vs_fp32"),
          "ort_int8_bound_vs_fp32_deit_tiny_b64": payload.get("ceiling", {}).get(
              "bound_int8_vs_fp32_b64"),
          "families_exported": payload.get("families_exported", []),
          "parity_same_top1": {k: r["onnx_same_top1"] for k, r in pa.items()},
          "parity_max_abs_delta_logit": {k: r["onnx_max_abs_delta_logit"] for k, r in pa.items()}}


def page(payload: dict) -> str:
  s = payload["summary"]
  lines = ["# Deploy: QDQ ONNX in ONNX Runtime", "",
           f"Written by `benchmarks/deploy.py` (git commit `{payload.get('git_commit', '?')}`).",
           f"Families exported (tests, every CI run): {', '.join(s['families_exported'])}.", ""]
  if payload.get("parity"):
    lines += ["## Parity with the fake-quant model (every test image)", "",
              "| case | model | setting | bias corr. | images | run top-1 | ONNX Runtime top-1 "
              "| same top-1 as fake-quant | max abs Δlogit | JAX integer same top-1 "
              "| fake-quant at another batch size: same top-1 |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in payload["parity"].items():
      lines.append(f"| {k} | {r['model']} | {r['setting']} | {'yes' if r['bias_correction'] else 'no'}"
                   f" | {r['test_images']:,} | {r['run_top1']:.2f} | {r['onnx_top1']:.2f} | "
                   f"{r['onnx_same_top1']:.2f}% | {r['onnx_max_abs_delta_logit']:.4f} | "
                   f"{r['jax_integer_same_top1']:.2f}% | "
                   f"{r.get('fake_quant_other_batch_same_top1', float('nan')):.2f}% "
                   f"(batch {r.get('fake_quant_other_batch', '?')}) |")
    lines += ["", "The run's top-1 and the fake-quant column are the fake-quant model at the run's "
              "eval batch size; the last column scores the same model at another batch size, "
              "which XLA compiles to another float32 program.", "",
              "Where they differ, it is rounding, amplified: the fraction of values on another "
              "code in the exact integer walk than in the same program in float32, at the first, "
              "middle and last activation quantization point, and the largest (50 test "
              "images):", ""]
    for k, r in payload["parity"].items():
      d = r.get("points_off_by_a_step")
      if d:
        lines.append(f"- {k}: {d[0]:.1e} → {d[len(d) // 2]:.1e} → {d[-1]:.1e}, largest "
                     f"{max(d):.1e} ({len(d)} points)")
  if payload.get("speed"):
    cpus = sorted({cpu_line(r["cpu"]) for r in payload["speed"].values() if "cpu" in r})
    lines += ["", "## Speed (2 threads, random images)", "",
              *([f"CPU: {'; '.join(cpus)}.", ""] if cpus else []),
              "| model | setting | batch 64 images/s: ORT int8 | ORT fp32 | JAX fp32 | JAX integer "
              "| ORT int8 / fp32 (b64) | batch 1 ms: ORT int8 | ORT fp32 | ORT int8 / fp32 (b1) "
              "| load avg before → after |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in payload["speed"].items():
      b64 = lambda m: f"{r[m]['b64_images_per_s']:.1f}"  # noqa: E731, B023
      b1 = lambda m: f"{r[m]['b1_median_ms']:.2f}"  # noqa: E731, B023
      lines.append(f"| {r['model']} | {r['setting']} | {b64('ort_int8')} | {b64('ort_fp32')} | "
                   f"{b64('jax_fp32')} | {b64('jax_integer')} | **{r['ort_int8_vs_fp32_b64']:.2f}×**"
                   f" | {b1('ort_int8')} | {b1('ort_fp32')} | {r['ort_int8_vs_fp32_b1']:.2f}× | "
                   f"{r['load_before']} → {r['load_after']} |")
    if payload.get("speed_earlier"):
      lines += ["", "Earlier runs of the same benchmark (the ratios move this much from run to "
                "run on this machine):", "",
                "| commit | model | batch 64 images/s: ORT int8 | ORT fp32 | JAX fp32 "
                "| ORT int8 / fp32 (b64) | (b1) | load avg before |",
                "|---|---|---|---|---|---|---|---|"]
      for r in payload["speed_earlier"]:
        ips = r.get("b64_images_per_s", {})
        cells = " | ".join(f"{ips[m]:.1f}" if m in ips else "–"
                           for m in ("ort_int8", "ort_fp32", "jax_fp32"))
        lines.append(f"| {(r['git_commit'] or '?')[:7]} | {r['model']} | {cells} | "
                     f"{r['ort_int8_vs_fp32_b64']:.2f}× | {r['ort_int8_vs_fp32_b1']:.2f}× | "
                     f"{r['load_before']} |")
    lines += ["", "File sizes (bytes on disk): the ONNX files hold weights unpacked in int8 "
              "containers; the packed export (`evolq export`, .safetensors) holds 3/4-bit codes "
              "two per byte.", "", "| model | ONNX int8 | ONNX fp32 | packed export |",
              "|---|---|---|---|"]
    mib = lambda b: f"{b / 2 ** 20:.2f} MiB"  # noqa: E731
    for k, r in payload["speed"].items():
      b = r["bytes"]
      lines.append(f"| {r['model']} | {mib(b['onnx_int8'])} | {mib(b['onnx_fp32'])} | "
                   f"{mib(b['packed_export'])} |")
    lines += ["", "ONNX Runtime's profile of the int8 graph (batch 64): the five op types "
              "taking most time, the integer kernels it fused, and the matmuls/convs it left "
              "in float.", ""]
    for k, r in payload["speed"].items():
      p = r["profile"]
      share = ", ".join(f"{op} {100 * v:.1f}%" for op, v in list(p["time_share"].items())[:5])
      lines.append(f"- {r['model']}: {share}; integer kernels {p['integer_kernels']}; "
                   f"float {p['float_matmuls_convs'] or 'none'}.")
  if payload.get("ceiling"):
    c = payload["ceiling"]
    lines += ["", f"## What int8 can win here at most ({c['model']}, batch 64, 2 threads)", "",
              f"`{payload.get('ceiling_command', 'python benchmarks/deploy.py ceiling')}`, load "
              f"average {c['load_before']} → {c['load_after']}, on {cpu_line(c['cpu'])}. "
              "One ONNX Runtime matmul at each "
              "of the model's linear shapes, fp32 against the QDQ int8 pattern the export "
              "writes (uint8 activations per tensor, int8 weights per channel):", "",
              "| layer | rows × in × out | fp32 ms | int8 ms | int8 / fp32 speed |",
              "|---|---|---|---|---|"]
    for layer, r in c["matmuls"].items():
      lines.append(f"| {layer} | {' × '.join(map(str, r['shape']))} | {r['fp32_ms']:.1f} | "
                   f"{r['int8_ms']:.1f} | {r['int8_vs_fp32']:.2f}× |")
    lines += ["", f"One of each (a block's mix): **{c['matmul_int8_vs_fp32']:.2f}×**. Matmuls take "
              f"{100 * c['fp32_matmul_share']:.0f}% of the fp32 graph's time (its profile), so "
              "with every other op as fast as in fp32 and no Q/DQ cost at all the whole graph "
              f"could run at most **{c['bound_int8_vs_fp32_b64']:.2f}×** fp32.", "",
              "The whole graph with the QDQ overheads taken out (these change the model; "
              "timed for speed only, best of the runs, interleaved):", "",
              "| graph | images/s | / fp32 |", "|---|---|---|"]
    labels = {"fp32": "fp32 (no Q/DQ)", "int8": "int8 as exported (bias correction on)",
              "int8_float_points": f"int8, the {c['float_points_taken_out']} points no matmul "
                                   "reads left in float",
              "int8_no_bias_correction": "int8, bias correction off",
              "int8_no_bias_correction_float_points": "int8, both"}
    for k, v in c["graphs_b64_images_per_s"].items():
      ratio = c["graphs_vs_fp32_b64"].get(k, 1.0)
      lines.append(f"| {labels.get(k, k)} | {v:.1f} | {ratio:.2f}× |")
  return "\n".join(lines) + "\n"


def cpu_line(c: dict) -> str:
  return (f"{c['model']}, {c['cores']} cores, {', '.join(c['flags']) or 'none'} of "
          f"{'/'.join(CPU_FLAGS)}" + ("" if has_int8_dot(c) else
                                      " (no VNNI: no int8 dot-product instructions)"))


def earlier_speed(payload: dict) -> list:
  """The ratios of the speed runs before this one (one row per model and run), kept
  so that the page shows how much they move from run to run on this machine."""
  rows = list(payload.get("speed_earlier", []))
  for r in payload.get("speed", {}).values():
    rows.append({"git_commit": payload.get("git_commit"), "model": r["model"],
                 "ort_int8_vs_fp32_b64": r["ort_int8_vs_fp32_b64"],
                 "ort_int8_vs_fp32_b1": r["ort_int8_vs_fp32_b1"],
                 "b64_images_per_s": {m: r[m]["b64_images_per_s"] for m in
                                      ("ort_int8", "ort_fp32", "jax_fp32")},
                 "load_before": r["load_before"]})
  return rows


def write(payload: dict):
  from evolq_jax.models.registry import FAMILIES
  payload["families_exported"] = sorted(FAMILIES)  # tests/test_onnx.py exports each, every CI run
  payload["git_commit"] = git_commit()
  payload["summary"] = summary(payload)
  write_results(NAME, payload, page(payload))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("part", choices=("parity", "speed", "ceiling", "report"))
  ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
  ap.add_argument("--models", nargs="+", default=list(SPEED_MODELS), choices=list(SPEED_MODELS))
  ap.add_argument("--w-bits", type=int, default=4, help="weight bits of the speed exports")
  ap.add_argument("--reps1", type=int, default=30, help="batch-1 runs (median)")
  ap.add_argument("--reps64", type=int, default=5, help="batch-64 runs (best)")
  args = ap.parse_args()
  log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
  payload = load_json()
  if args.part == "parity":
    for case in args.cases:
      payload.setdefault("parity", {})[case] = parity_case(case, log)
      write(payload)
  elif args.part == "speed":
    payload["speed_earlier"] = earlier_speed(payload)
    with tempfile.TemporaryDirectory() as tmp:
      for key in args.models:
        payload.setdefault("speed", {})[key] = speed_model(key, tmp, args, log)
        payload["speed_command"] = " ".join(["python"] + sys.argv)
        write(payload)
  elif args.part == "ceiling":
    with tempfile.TemporaryDirectory() as tmp:
      payload["ceiling"] = ceiling(tmp, args, log)
    payload["ceiling_command"] = " ".join(["python"] + sys.argv)
    write(payload)
  else:
    write(payload)


if __name__ == "__main__":
  main()
