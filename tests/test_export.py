"""Integer export: the file format (bit-exact round trip), the int8 kernels
(exact), the integer ViT ("int" mode, walked on integer kernels) and ONNX Runtime against the
fake-quant model, the jax.export artifact in a process without evolq_jax, and
`evolq export` (integer and ONNX) on a search run."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import without_ptf

from evolq_jax.cli import main
from evolq_jax.config import bits_config, quant_config
from evolq_jax.export import (SCHEMA_VERSION, build_export, load_export, pack_codes,
                              ptf_exponents, save_export, unpack_codes)
from evolq_jax.integer import int_conv, int_dot, int_forward, int_logits
from evolq_jax.integer.artifact import load_artifact, save_artifact
from evolq_jax.pipeline import load_data, load_model, predict
from evolq_jax.qparams import QPARAMS_FILE, QParams
from evolq_jax.quant.bits import BitSpec
from evolq_jax.quant.weights import (bias_correct, bias_correction_affine, calibrate_weights,
                                     quantize_kernel)

N_TEST = 500  # benchmarks/export_size.py checks all 10,000


@pytest.fixture(scope="module")
def fixture(fixture_acts):
  """The bundled fixture, its activations calibrated once (conftest.fixture_acts)."""
  return fixture_acts


def _setting(fixture, **kw):
  cfg, qcfg, params, acts, _ = fixture
  qcfg = dataclasses.replace(qcfg, **kw)
  return qcfg, QParams(calibrate_weights(params, qcfg.w_spec, qcfg.w_observer), acts)


def _parity(fixture, qcfg, qparams, n=N_TEST):
  cfg, _, params, _, images = fixture
  fq = predict(cfg, params, images[:n], qcfg, qparams)
  export = build_export(cfg, qcfg, params, qparams)
  il = int_logits(export, images[:n])
  return fq, il, export


def _check_parity(fq, il, export, min_agree, max_steps=8):
  step = float(export.arrays["acts/head_out/scale"])
  agree = np.mean(fq.argmax(-1) == il.argmax(-1))
  assert agree >= min_agree, agree
  # where top-1 differs, the fake-quant model's own top two are within 3 logit steps
  top2 = np.sort(fq, -1)[:, -2:]
  margin = (top2[:, 1] - top2[:, 0])[fq.argmax(-1) != il.argmax(-1)]
  assert np.all(margin <= 3.01 * step), margin / step
  assert np.max(np.abs(fq - il)) <= max_steps * step  # one flip upstream moves a few steps


@pytest.mark.parametrize("w_bits", [8, 4, 3])
def test_integer_vit_and_onnx_runtime_match_fake_quant(fixture, w_bits):
  """The reference init (min/max uint weights + bias correction, PTF, uniform softmax):
  the integer forward and ONNX Runtime on the QDQ export, each against the same fake-quant
  logits (500 test images here; benchmarks/deploy.py checks all 10,000)."""
  qcfg, qparams = _setting(fixture, w_bits=w_bits, bias_correction=True)
  fq, il, export = _parity(fixture, qcfg, qparams)
  _check_parity(fq, il, export, min_agree=0.995)
  onnx = pytest.importorskip("onnx")
  ort = pytest.importorskip("onnxruntime")
  from evolq_jax.integer.to_onnx import export_onnx
  model = export_onnx(export)
  ol = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
      None, {"images": np.asarray(fixture[-1], np.float32)})[0]
  assert np.mean(fq.argmax(-1) == ol.argmax(-1)) >= 0.996
  if w_bits < 8:  # 8-bit asymmetric weights need uint8 with zero points, the slow path
    types = {i.data_type for i in model.graph.initializer if i.name.startswith("w_q")}
    assert types == {onnx.TensorProto.INT8}


def test_log2_softmax_signed_weights_and_no_ptf(fixture):
  """The other quantizers: log2 probabilities, a signed weight grid, uniform LayerNorm inputs
  (the residual points' PTF scales replaced by one scale per tensor, their largest)."""
  qcfg, qparams = without_ptf(*_setting(fixture, w_bits=4, log2_softmax=True, w_signed=True))
  fq, il, export = _parity(fixture, qcfg, qparams, 300)
  assert export.manifest["acts"]["blocks_0/attn/probs"] == {"quantizer": "log2", "bits": 4}
  assert export.manifest["acts"]["blocks_0/resid1"]["quantizer"] == "uniform"
  _check_parity(fq, il, export, min_agree=0.99, max_steps=20)  # log2's grid is coarse


def test_round_trip_is_bit_exact(fixture, tmp_path):
  cfg, _, params, _, images = fixture
  qcfg, qparams = _setting(fixture, w_bits=3, bias_correction=True)
  export = build_export(cfg, qcfg, params, qparams, source={"note": "test"})
  paths = save_export(str(tmp_path / "m.safetensors"), export)
  back = load_export(paths["export"])
  assert back.manifest == export.manifest
  assert back.manifest["schema_version"] == SCHEMA_VERSION
  assert json.loads(open(paths["manifest"]).read()) == export.manifest
  assert sorted(back.arrays) == sorted(export.arrays)
  for k, v in export.arrays.items():
    assert back.arrays[k].dtype == v.dtype and back.arrays[k].shape == v.shape, k
    assert np.array_equal(back.arrays[k], v), k
  assert export.arrays["weights/blocks_0/attn/qkv/codes"].size == 96 * 288 // 2  # 2 per byte
  assert export.arrays["acts/blocks_0/resid1/exponent"].dtype == np.int8
  a, b = int_logits(export, images[:100]), int_logits(back, images[:100])
  assert np.array_equal(a, b)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_code_packing_round_trips(bits):
  codes = np.random.default_rng(bits).integers(0, 2 ** bits, (7, 5)).astype(np.uint8)
  packed = pack_codes(codes, bits)
  assert packed.size == (18 if bits <= 4 else 35)
  assert np.array_equal(unpack_codes(packed, bits, (7, 5)), codes)


def test_bias_correction_is_a_scale_and_an_input_sum_term():
  """s'(u - z) + t, the exported form, is the fake-quant's bias-corrected kernel."""
  from evolq_jax.export import integer_layer
  w = jax.random.normal(jax.random.key(0), (16, 5)) * jnp.arange(1, 6)
  w = w.at[:, 4].set(0.3)  # a constant channel: all its codes are equal
  spec = BitSpec(3)
  scale, zp = calibrate_weights({"l": {"kernel": w}}, spec)["l"].values()
  arrays, entry = integer_layer(w, None, scale, zp, spec, bias_correction=True)
  codes = unpack_codes(arrays["codes"], 3, entry["shape"]).astype(np.float32)
  rebuilt = arrays["scale"] * (codes - arrays["zero_point"]) + arrays["input_sum_coef"]
  want = quantize_kernel(w, scale, zp, spec, bias_correction=True)
  np.testing.assert_allclose(rebuilt[:, :4], want[:, :4], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(rebuilt[:, 4], 0.3, rtol=1e-6)  # its FP mean
  gain, shift = bias_correction_affine(w, w)
  np.testing.assert_allclose(gain[:4], 1.0, rtol=1e-6)
  np.testing.assert_allclose(gain[:4] * w[:, :4] + shift[:4], bias_correct(w, w)[:, :4],
                             rtol=1e-5, atol=1e-6)


def test_int8_matmul_is_exact():
  rng = np.random.default_rng(0)
  a = rng.integers(-128, 128, (2, 3, 7, 40)).astype(np.int8)
  w = rng.integers(-128, 128, (40, 6)).astype(np.int8)
  a_off, w_off = np.int32(101), rng.integers(-200, 200, 6).astype(np.int32)
  dense = (((3,), (0,)), ((), ()))
  acc, a_sum = int_dot(jnp.asarray(a), a_off, jnp.asarray(w), jnp.asarray(w_off), dense)
  a64, w64 = a.astype(np.int64) + a_off, w.astype(np.int64) + w_off
  assert acc.dtype == jnp.int32 and np.array_equal(acc, a64 @ w64)
  assert np.array_equal(a_sum[..., 0], a64.sum(-1))
  b = rng.integers(-128, 128, (2, 3, 40, 9)).astype(np.int8)  # batched: attention
  batched = (((3,), (2,)), ((0, 1), (0, 1)))
  acc, _ = int_dot(jnp.asarray(a), a_off, jnp.asarray(b), np.int32(-7), batched)
  assert np.array_equal(acc, a64 @ (b.astype(np.int64) - 7))


@pytest.mark.parametrize("groups,stride,pad", [(1, 2, ((1, 1), (1, 1))), (5, 1, ((2, 2), (2, 2))),
                                              (5, 2, ((1, 2), (1, 2)))])
def test_int8_conv_is_exact(groups, stride, pad):
  """Strided and depthwise convolutions with zero points on both sides; the padding holds
  the code whose centered value is 0, as the float convolution pads with zeros."""
  from jax import lax
  rng = np.random.default_rng(groups + stride)
  a = rng.integers(-128, 128, (2, 9, 9, 5)).astype(np.int8)
  k = 5 if groups > 1 else 3
  w = rng.integers(-128, 128, (k, k, 5 // groups, 5)).astype(np.int8)
  a_off, w_off = np.int32(37), rng.integers(-60, 60, 5).astype(np.int32)
  dn = lax.conv_dimension_numbers(a.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  params = dict(window_strides=(stride, stride), padding=pad, lhs_dilation=(1, 1),
                rhs_dilation=(1, 1), dimension_numbers=dn, feature_group_count=groups)
  acc, win = int_conv(jnp.asarray(a), a_off, jnp.asarray(w), jnp.asarray(w_off), params)
  want = lax.conv_general_dilated(
      jnp.asarray(a, jnp.float32) + a_off, jnp.asarray(w, jnp.float32) + w_off, (stride, stride),
      pad, dimension_numbers=dn, feature_group_count=groups)
  assert acc.dtype == jnp.int32 and np.array_equal(acc, np.asarray(want).astype(np.int64))
  ones = jnp.ones((k, k, 5 // groups, 5), jnp.float32)
  sums = lax.conv_general_dilated(jnp.asarray(a, jnp.float32) + a_off, ones, (stride, stride), pad,
                                  dimension_numbers=dn, feature_group_count=groups)
  assert np.array_equal(win * np.ones(5, np.int32), np.asarray(sums).astype(np.int64))


def test_ptf_exponents_and_clear_errors(fixture, tmp_path):
  base, e = ptf_exponents(np.float32(0.03) * 2.0 ** np.array([2, 0, 3, 1], np.float32))
  assert float(base) == np.float32(0.03) and e.tolist() == [2, 0, 3, 1]
  with pytest.raises(ValueError, match="not power-of-two multiples"):
    ptf_exponents(np.array([0.1, 0.3], np.float32))
  cfg, qcfg, params, acts, _ = fixture
  bad = jax.tree.map(lambda x: x, acts)
  bad["patch_out"] = {**bad["patch_out"], "zero_point": bad["patch_out"]["zero_point"] + 0.5}
  with pytest.raises(ValueError, match="'patch_out' holds non-integer zero point"):
    build_export(cfg, qcfg, params, QParams(calibrate_weights(params, qcfg.w_spec), bad))
  with pytest.raises(ValueError, match="no 'evolq_manifest' manifest"):
    load_export("evolq_jax/checkpoints/vit_fixture_patch4_28.safetensors")
  export = build_export(cfg, qcfg, params, QParams(calibrate_weights(params, qcfg.w_spec), acts))
  export.manifest["schema_version"] = 99
  path = save_export(str(tmp_path / "v99.safetensors"), export)["export"]
  with pytest.raises(ValueError, match="version 99: this evolq_jax reads"):
    load_export(path)
  export.manifest["schema_version"] = SCHEMA_VERSION
  misfit = r"do not fit the exported model: expected \(batch, 28, 28, 1\)"
  with pytest.raises(ValueError, match=misfit):
    int_forward(export)[0](np.zeros((1, 32, 32, 1), np.float32))
  with pytest.raises(ValueError, match=misfit):
    int_logits(export, np.zeros((2, 32, 32, 1), np.float32))


def test_integer_forward_covers_every_quantized_matmul(fixture):
  """Every matmul whose input sits on a quantization grid runs on integers: all but the
  patch embedding (its input is the normalized image, not quantized, as in FQ-ViT)."""
  cfg, _, params, _, images = fixture
  qcfg, qparams = _setting(fixture, w_bits=4, bias_correction=True)
  fn, backend = int_forward(build_export(cfg, qcfg, params, qparams))
  jax.eval_shape(fn, images[:1])  # the walk counts as it goes (traced: nothing compiles)
  assert backend.counts == {"integer": 6 * 6 + 1, "float": 1}  # 6 per block + head; patches
  assert [f[0] for f in backend.floats] == ["conv_general_dilated"]


def test_artifact_runs_without_evolq_jax(fixture, tmp_path):
  cfg, _, params, _, images = fixture
  qcfg, qparams = _setting(fixture, w_bits=4, bias_correction=True)
  export = build_export(cfg, qcfg, params, qparams)
  path = save_artifact(str(tmp_path / "m.stablehlo"), export)
  pixels = np.asarray(images[:100], np.float32)  # normalized images, as the model takes them
  np.save(tmp_path / "pixels.npy", pixels)
  code = ("import sys, numpy as np, jax\n"
          f"e = jax.export.deserialize(bytearray(open({path!r}, 'rb').read()))\n"
          f"np.save({str(tmp_path / 'out.npy')!r}, np.asarray(e.call(np.load("
          f"{str(tmp_path / 'pixels.npy')!r}))))\n"
          "assert not any(m.startswith('evolq_jax') for m in sys.modules), 'imported evolq_jax'\n")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  subprocess.run([sys.executable, "-c", code], check=True, cwd=str(tmp_path), env=env)
  out = np.load(tmp_path / "out.npy")
  assert np.array_equal(out, np.asarray(load_artifact(path)(pixels)))  # same program, same bits
  il = int_logits(export, images[:100])  # jit with the weights as arguments: XLA may round apart
  assert np.mean(out.argmax(-1) == il.argmax(-1)) >= 0.98
  assert np.max(np.abs(out - il)) <= 3.01 * float(export.arrays["acts/head_out/scale"])


def test_evolq_export_on_a_tiny_search_run(fixture_run, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  shutil.copytree(fixture_run[0], workdir)  # the shared finished run (conftest)
  assert main(["export", "--workdir", workdir]) == 0
  out = capsys.readouterr().out
  for name in ("model_int.safetensors", "model_int.json", "model_int.stablehlo"):
    assert os.path.join(workdir, name) in out
  export = load_export(os.path.join(workdir, "model_int.safetensors"))
  assert export.manifest["model"]["preset"] == "vit_fixture_patch4_28"
  assert export.manifest["quant"]["w_bits"] == 3
  # the integer model is the run's quantized model: same top-1 as its fake-quant forward
  c = bits_config("W3A8", "vit_fixture_patch4_28", **{"eval.limit": 100})
  cfg, params = load_model(c)
  images = load_data(c, cfg)["test"][0]
  from evolq_jax.qparams import load_qparams
  qparams = load_qparams(os.path.join(workdir, QPARAMS_FILE))
  fq = predict(cfg, params, images, quant_config(c), qparams)
  assert np.mean(fq.argmax(-1) == int_logits(export, images).argmax(-1)) >= 0.99
  # an older run without qparams.safetensors: rebuilt from its orbax checkpoint, the same file
  os.remove(os.path.join(workdir, QPARAMS_FILE))
  other = str(tmp_path / "from_orbax.safetensors")
  assert main(["export", "--workdir", workdir, "--out", other, "--no-artifact"]) == 0
  again = load_export(other)
  assert all(np.array_equal(again.arrays[k], v) for k, v in export.arrays.items())
  assert main(["export", "--workdir", str(tmp_path / "nothing")]) == 2
  assert "holds no summary.json" in capsys.readouterr().err
  # ONNX: ONNX Runtime's top-1 is the fake-quant model's
  ort = pytest.importorskip("onnxruntime")
  assert main(["export", "--workdir", workdir, "--format", "onnx"]) == 0
  path = os.path.join(workdir, "model.onnx")
  assert path in capsys.readouterr().out
  sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  ol = sess.run(None, {"images": np.asarray(images, np.float32)})[0]
  assert np.mean(fq.argmax(-1) == ol.argmax(-1)) >= 0.99
  assert main(["export", "--workdir", workdir, "--format", "onnx", "--out", workdir]) == 2
  assert "is a directory: give a file path" in capsys.readouterr().err


def test_onnx_export_notes_a_cpu_without_int8_dot_products():
  """`evolq export --format onnx` says when this CPU's int8 kernels will not pay."""
  from evolq_jax.deploy import cpu_info, int8_speed_note
  note = int8_speed_note({"model": "Old CPU", "cores": 2, "flags": ["avx2", "fma"]})
  assert "Old CPU" in note and "VNNI" in note
  assert int8_speed_note({"model": "New", "cores": 2,
                          "flags": ["avx2", "avx512f", "avx512_vnni"]}) is None
  assert int8_speed_note({"model": "unknown", "cores": 2, "flags": []}) is None  # not x86/Linux
  info = cpu_info()
  assert set(info) == {"model", "cores", "flags"} and info["cores"] >= 1
