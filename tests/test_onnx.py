"""QDQ ONNX export and the integer forward for every registered family, from the
family's own module in "int" mode: onnx.checker, an ONNX Runtime session, logits
against the fake-quant model, a symbolic batch, int8 weight initializers; and on
the bundled fixture, ONNX Runtime's top-1 against the fake-quant model's."""
import dataclasses
import os

import jax
import numpy as np
import pytest
from conftest import tiny_config, tiny_qcfg

from evolq_jax.calibrate import calibrate
from evolq_jax.export import build_export
from evolq_jax.integer import int_logits
from evolq_jax.integer.to_onnx import export_onnx
from evolq_jax.models import init_params
from evolq_jax.models.registry import FAMILIES
from evolq_jax.pipeline import predict
from evolq_jax.qparams import QParams
from evolq_jax.quant.weights import calibrate_weights

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _session(model):
  return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("family,recipe", [(f, "reference W4A8") for f in sorted(FAMILIES)]
                         + [("vit", "W3A8 log2 no-PTF")])
def test_every_family_exports_and_runs(family, recipe):
  cfg = tiny_config(family)
  params = init_params(cfg, jax.random.key(0))
  images = np.asarray(jax.random.normal(jax.random.key(1), (16, cfg.img_size, cfg.img_size,
                                                            cfg.in_chans)))
  qcfg = tiny_qcfg()
  if recipe != "reference W4A8":
    qcfg = dataclasses.replace(qcfg, w_bits=3, log2_softmax=True, ptf=False)
  # one batch of 8, as test_families calibrates the same tiny model: one program
  qparams = calibrate(cfg, qcfg, params, images[:8], 8, progress=False)
  fq = predict(cfg, params, images, qcfg, qparams)
  export = build_export(cfg, qcfg, params, qparams)
  il = int_logits(export, images)
  model = export_onnx(export)
  onnx.checker.check_model(model, full_check=True)
  sess = _session(model)
  ol = sess.run(None, {"images": images})[0]
  assert ol.shape == (16, 10)
  np.testing.assert_allclose(sess.run(None, {"images": images[:3]})[0], ol[:3], atol=1e-5)
  scale = float(np.max(np.abs(fq)))
  for got in (il, ol):  # random weights calibrated on noise: small margins, coarse grids
    assert np.max(np.abs(got - fq)) <= 0.1 * scale
    assert np.mean(got.argmax(-1) == fq.argmax(-1)) >= 0.8
  # weights are int8 initializers read by DequantizeLinear on their channel axis
  inits = {i.name: i for i in model.graph.initializer}
  dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
  assert len(dq) == len(export.manifest["weights"])
  assert all(inits[n.input[0]].data_type == onnx.TensorProto.INT8 for n in dq)
  assert all(any(a.name == "axis" for a in n.attribute) for n in dq)
  meta = {p.key: p.value for p in model.metadata_props}
  assert meta["num_classes"] == "10" and "NHWC" in meta["input"]


@pytest.fixture(scope="module")
def fixture(fixture_acts):
  """The bundled fixture (conftest.fixture_acts) with the reference's bias correction.
  ONNX Runtime's top-1 against the fake-quant model's: test_export, beside the integer
  forward's, on the same logits."""
  cfg, qcfg, params, acts, images = fixture_acts
  return cfg, dataclasses.replace(qcfg, bias_correction=True), params, acts, images


def _integer_kernels(model, tmp_path) -> list:
  """The integer kernels in the graph ONNX Runtime's optimizer makes of `model`."""
  opts = ort.SessionOptions()
  opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
  ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
  ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
  return [o for o in ops if o in ("QLinearMatMul", "MatMulIntegerToFloat", "QLinearConv",
                                  "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul",
                                  "QGemm")]


def test_onnx_runtime_fuses_integer_kernels(fixture, tmp_path, monkeypatch):
  """ONNX Runtime's optimizer turns the QDQ matmuls into integer kernels; the deploy
  benchmark's ceiling graph (the points no matmul reads left in float) keeps all of them."""
  cfg, qcfg, params, acts, images = fixture
  qcfg = dataclasses.replace(qcfg, w_bits=4)
  qparams = QParams(calibrate_weights(params, qcfg.w_spec, qcfg.w_observer), acts)
  model = export_onnx(build_export(cfg, qcfg, params, qparams))
  integer = _integer_kernels(model, tmp_path)
  assert len(integer) >= 6 * 4 + 1, integer  # qkv, proj, fc1, fc2 per block, head

  monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
  import deploy
  count = lambda m, op: sum(n.op_type == op for n in m.graph.node)  # noqa: E731
  before = count(model, "QuantizeLinear")
  lean, pairs = deploy.without_float_points(onnx.load_from_string(model.SerializeToString()))
  onnx.checker.check_model(lean)
  assert pairs > 0 and count(lean, "QuantizeLinear") == before - pairs
  assert len(_integer_kernels(lean, tmp_path)) == len(integer)  # a matmul whose output
  # point is gone runs as MatMulIntegerToFloat instead of QLinearMatMul
  x = np.asarray(images[:8], np.float32)
  assert _session(lean).run(None, {"images": x})[0].shape == (8, cfg.num_classes)


def test_onnx_export_without_onnx_says_what_to_install(monkeypatch):
  import builtins
  real = builtins.__import__

  def no_onnx(name, *a, **kw):
    if name == "onnx" or name.startswith("onnx."):
      raise ImportError("No module named 'onnx'")
    return real(name, *a, **kw)
  monkeypatch.setattr(builtins, "__import__", no_onnx)
  from evolq_jax.integer.to_onnx import require_onnx
  with pytest.raises(ImportError, match=r"pip install 'evolq_jax\[onnx\]'"):
    require_onnx()


def test_the_readme_deploy_snippet_runs(fixture, tmp_path):
  """README's five lines, on an image folder the test writes and the fixture's ONNX file."""
  import re

  from PIL import Image
  cfg, qcfg, params, acts, _ = fixture
  qparams = QParams(calibrate_weights(params, qcfg.w_spec, qcfg.w_observer), acts)
  model = export_onnx(build_export(cfg, qcfg, params, qparams))
  onnx.save(model, str(tmp_path / "model.onnx"))
  rng = np.random.default_rng(0)
  (tmp_path / "photos").mkdir()
  (tmp_path / "photos" / "classes.txt").write_text("a\nb\n")
  for cls in ("a", "b"):
    (tmp_path / "photos" / "val" / cls).mkdir(parents=True)
    for i in range(3):
      Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(
          tmp_path / "photos" / "val" / cls / f"{i}.png")
  readme = open("README.md").read()
  code = re.search(r"<!-- deploy-snippet -->\n```python\n(.*?)```", readme, re.S).group(1)
  assert len(code.strip().splitlines()) == 5
  code = (code.replace('"photos"', repr(str(tmp_path / "photos")))
          .replace('"runs/lite0/model.onnx"', repr(str(tmp_path / "model.onnx")))
          .replace('"efficientnet_lite0"', '"vit_fixture_patch4_28"'))
  scope = {}
  exec(compile(code, "README deploy snippet", "exec"), scope)
  assert scope["logits"].shape == (6, 10) and list(scope["labels"]) == [0, 0, 0, 1, 1, 1]
