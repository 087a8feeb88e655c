"""LeViT: parity with timm (BatchNorm folded on load), every preset's shapes,
checkpoint files, the FQ-ViT layout of the reference (traced; test_families and
test_onnx run the quantized modes), the searched units and the CLI end to end."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from evolq_jax.cli import main
from evolq_jax.config import QuantConfig
from evolq_jax.models import (act_rules, calibration_stats, fp_logits, get_preset, load_params,
                              register_preset)
from evolq_jax.models.convert import expected_shapes, from_timm_state_dict, timm_to_flax_flat
from evolq_jax.models.levit import attention_bias_idxs, units
from evolq_jax.quant.recipe import rule_for
from evolq_jax.quant.weights import kernel_paths
from evolq_jax.search import SearchConfig

from conftest import calibrated_shapes, import_timm, tiny_config

PRESETS = ("levit_128s", "levit_128", "levit_192", "levit_256", "levit_384")
# timm's own code at small sizes: 96 px -> token grids 6, 3 (odd: ceil subsampling), 2.
TINY_KW = dict(img_size=96, embed_dim=(32, 48, 64), key_dim=8, num_heads=(2, 3, 4),
               depth=(1, 1, 1), num_classes=10)
TINY = dataclasses.replace(get_preset("levit_128s"), name="levit_tiny_test", **TINY_KW)
# min/max observers: OMSE's per-point search compiles slowly (the CLI test runs it)
QCFG = QuantConfig(w_bits=4, a_bits=8, a_observer="minmax")
N = 40


def _perturbed(state: dict, seed: int = 1) -> dict:
  """timm's init has BN weights 0 on residual branches, zero BN statistics and
  biases: give every float entry random values so the logits are O(1..10)."""
  import torch
  gen, out = torch.Generator().manual_seed(seed), {}
  for key, v in state.items():
    noise = torch.randn(v.shape, generator=gen) if v.is_floating_point() else None
    if noise is None:
      out[key] = v
    elif key.endswith("running_var"):
      out[key] = 0.5 + torch.rand(v.shape, generator=gen)
    elif key.endswith("bn.weight"):
      out[key] = 1.0 + 0.2 * noise
    elif v.ndim == 1 or key.endswith("attention_biases"):
      out[key] = 0.2 * noise
    else:
      out[key] = noise / float(np.prod(v.shape[1:])) ** 0.5
  return out


def _timm_levit(**kw):
  """A perturbed timm LevitDistilled in eval mode, built from kwargs."""
  import_timm()
  import torch
  from timm.models.levit import LevitDistilled
  torch.manual_seed(0)
  model = LevitDistilled(**kw).eval()
  model.load_state_dict(_perturbed(model.state_dict()))
  return model


def _compare(model, cfg, n=2):
  import torch
  x = np.random.default_rng(0).standard_normal((n, cfg.img_size, cfg.img_size, 3)).astype(
      np.float32)
  with torch.no_grad():
    want = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  params = from_timm_state_dict(model.state_dict(), cfg)
  got = np.asarray(jax.jit(lambda p, x: fp_logits(cfg, p, x))(params, x))
  scale, diff = float(np.abs(want).max()), float(np.abs(got - want).max())
  assert scale > 1.0, scale  # the check means something only if the logits are not ~0
  assert diff < 1e-4 * scale, (diff, scale)
  assert np.abs(want[0] - want[1]).max() > 10 * diff  # no broadcast bug across images


def test_levit_tiny_matches_timm():
  _compare(_timm_levit(**TINY_KW), TINY)


@pytest.mark.parametrize("name", PRESETS)
def test_levit_presets_match_timm_state_dicts(name):
  timm = import_timm()
  cfg = get_preset(name)
  state = {k: v.numpy() for k, v in timm.create_model(name, pretrained=False).state_dict().items()}
  flat = timm_to_flax_flat(state, cfg)
  assert {k: v.shape for k, v in flat.items()} == expected_shapes(cfg)
  assert not any("/bn_" in k for k in flat)  # every BatchNorm folded into its layer
  assert len(units(cfg)) == sum(cfg.depth) + len(cfg.depth) - 1  # blocks + downsamples


def test_levit_attention_bias_idxs_are_timms():
  import_timm()
  from timm.models.levit import Attention, AttentionDownsample
  a = Attention(dim=16, key_dim=4, num_heads=2, resolution=5)
  d = AttentionDownsample(16, 24, key_dim=4, num_heads=2, resolution=5)
  np.testing.assert_array_equal(attention_bias_idxs(5, 1), a.attention_bias_idxs.numpy())
  np.testing.assert_array_equal(attention_bias_idxs(5, 2), d.attention_bias_idxs.numpy())


def test_levit_timm_safetensors_file_matches_state_dict(tmp_path):
  from safetensors.torch import save_file
  sd = _timm_levit(**TINY_KW).state_dict()
  path = tmp_path / "levit_tiny_timm.safetensors"
  save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
  flat = lambda t: traverse_util.flatten_dict(t, sep="/")  # noqa: E731
  got, want = flat(load_params(str(path), TINY)), flat(from_timm_state_dict(sd, TINY))
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # an old-style checkpoint with the bias index tables still loads
  old = dict(sd, **{"stages.0.blocks.0.attn.attention_bias_idxs": np.zeros((36, 36), np.int64)})
  assert sorted(flat(from_timm_state_dict(old, TINY))) == sorted(want)


def test_levit_config_and_conv_checkpoint_errors_are_clear():
  with pytest.raises(ValueError, match="multiple of 16"):
    dataclasses.replace(TINY, img_size=100)
  state = {k: v for k, v in _timm_levit(**TINY_KW).state_dict().items()
           if k != "stages.0.blocks.0.mlp.ln1.linear.weight"}
  with pytest.raises(ValueError, match=r"stages_0/blocks_0/mlp/ln1.*levit_conv"):
    from_timm_state_dict(state, TINY)


# ------------------------------------------------------------- quantized modes --

@pytest.fixture(scope="module")
def tiny():
  """The tiny LeViT's params, and the shapes of what calibrating it returns (traced, not
  compiled: test_families and test_onnx run the quantized LeViT)."""
  params = from_timm_state_dict(_timm_levit(**TINY_KW).state_dict(), TINY)
  x = jax.ShapeDtypeStruct((N, 96, 96, 3), jnp.float32)
  return params, x, calibrated_shapes(TINY, QCFG, params, x)


def test_levit_layout_is_the_references(tiny):
  params, x, qparams = tiny
  s = jax.eval_shape(lambda: calibration_stats(TINY, params, jnp.zeros((2, 96, 96, 3)))[1]
                     ["stats"])
  assert set(s) == {"stem", "embed", "stages_0", "stages_1", "stages_2", "postblocks",
                    "pool_out", "head_out", "head_dist_out", "logits_out"}
  assert set(s["stem"]) == ({f"conv{k}_out" for k in range(1, 5)}
                            | {f"act{k}_out" for k in range(1, 4)})
  attn = {"queries", "keys", "values", "qk", "logits", "probs", "context", "proj_out"}
  block, down = s["stages_0"]["blocks_0"], s["stages_1"]["downsample"]
  assert set(block) == {"attn", "resid1", "mlp", "resid2"} and set(block["attn"]) == attn
  assert set(down) == {"attn_downsample", "mlp", "resid2"}  # no residual around it
  assert set(down["attn_downsample"]) == attn | {"act_out"}
  assert set(block["mlp"]) == {"ln1_out", "act_out"}
  # 4 heads (32 // key_dim 8); queries from every other token of the 6x6 grid, keys from all
  assert down["attn_downsample"]["queries"].shape == (2, 4, 9, 8)
  assert down["attn_downsample"]["keys"].shape == (2, 4, 36, 8)
  assert jax.tree.structure(jax.tree.map(lambda a: 0, s)) == jax.tree.structure(
      jax.tree.map(lambda d: 0, qparams.acts, is_leaf=lambda d: "scale" in d))
  # PTF (per channel) exactly on the stem and the residual outputs
  flat = traverse_util.flatten_dict(qparams.acts, sep="/")
  per_channel = sorted(k[:-len("/scale")] for k, v in flat.items()
                       if k.endswith("/scale") and np.ndim(v) == 1)
  rules = act_rules(TINY, QCFG)
  assert per_channel == sorted(k[:-len("/scale")] for k in flat if k.endswith("/scale") and
                               rule_for(rules, k[:-len("/scale")]).quantizer == "ptf")
  assert len(per_channel) == 7 + 2 * 3 + 2  # stem, 3 blocks, 2 downsamples
  assert rule_for(act_rules(TINY, dataclasses.replace(QCFG, log2_softmax=True)),
                  "stages_1/downsample/attn_downsample/probs").quantizer == "log2"
  # every kernel quantized: stem convs, attention, MLP, both heads
  layers = {tuple(k.key for k in p[:-1])
            for p, _ in jax.tree_util.tree_flatten_with_path(qparams.weights)[0]}
  assert layers == set(kernel_paths(params)) and len(layers) == 4 + 3 * 4 + 2 * 5 + 2
  assert [tuple(l.name for l in u.layers if l.group == "attn") for u in units(TINY)] == [
      ("qkv", "proj")] + [("kv", "q", "proj"), ("qkv", "proj")] * 2


def test_search_units_picks_a_subset_and_names_bad_entries():
  """search.units: indices from either end; an index out of range, or a unit
  without a selected layer, is an error that names it."""
  from evolq_jax.search.space import SearchSpace
  all_units = units(TINY)  # 5 units; 1 and 3 downsample (kv, q, proj: no qkv)
  assert SearchConfig(units=[-1]).space.searched_units(all_units) == (4,)
  assert SearchSpace(units=(3, 0, -5)).searched_units(all_units) == (0, 3)
  assert SearchSpace(("qkv",), units=(-1, 2)).searched_units(all_units) == (2, 4)
  with pytest.raises(ValueError, match=r"entries \[5\] are out of range: this model has 5 units"):
    SearchSpace(units=(5,)).searched_units(all_units)
  with pytest.raises(ValueError, match=r"unit\(s\) \[1\] hold none of search.layers"):
    SearchSpace(("qkv",), units=(1, 2)).searched_units(all_units)
  with pytest.raises(ValueError, match=r"search.units='last'"):
    SearchConfig(units="last")


def test_levit_units_without_a_selected_layer_are_skipped():
  """search.layers=("qkv",): the downsampling units (kv, q, proj) hold no qkv, so the
  search skips them instead of failing midway (run: the CLI test below)."""
  from evolq_jax.search.space import SearchSpace
  assert SearchSpace(("qkv",)).searched_units(units(TINY)) == (0, 2, 4)
  assert SearchSpace().searched_units(units(TINY)) == (0, 1, 2, 3, 4)
  with pytest.raises(ValueError, match=r"\['fc1'\] name no layer"):
    SearchSpace(("fc1",)).searched_units(units(TINY))


# ------------------------------------------------------------------------ CLI --

def _image_folder(root, per_class, classes):
  """train/ and validation/ with 2 of `classes` classes (classes.txt lists them all)."""
  from PIL import Image
  rng = np.random.default_rng(0)
  classes = [f"n{i:05d}" for i in range(classes)]
  root.mkdir()
  (root / "classes.txt").write_text("\n".join(classes) + "\n")
  for split in ("train", "validation"):
    for cls in classes[:2]:
      (root / split / cls).mkdir(parents=True)
      for k in range(per_class):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
            root / split / cls / f"{k}.jpg")


def test_levit_search_command_end_to_end(tmp_path, capsys):
  """configs/imagenet.py on a small registered LeViT (conftest.tiny_config, random
  weights), W4A8, on generated JPEGs, with search.layers=("qkv",): the downsampling unit
  (kv, q, proj) holds no qkv and is skipped, not a failure midway, and the held-out pick
  still closes each of the two passes on the first searched unit. It calibrates as
  test_families does (same model, recipe and batch: one compiled program for both)."""
  cfg = register_preset(dataclasses.replace(tiny_config("levit"), name="levit_cli_test"))
  _image_folder(tmp_path / "data", per_class=8, classes=cfg.num_classes)
  sets = ["checkpoint=random", "data.source=image_folder", f"data.dir={tmp_path / 'data'}",
          "calib.num_images=8", "calib.batch_size=8", "eval.limit=8", "eval.batch_size=8",
          "holdout.num_images=8", "search.passes=2", "search.generations=1",
          "search.children=1", "search.loss_batch=4", "search.layers=('qkv',)",
          "quant.a_observer=minmax"]  # conftest.tiny_qcfg
  args = ["search", "--config", f"configs/imagenet.py:{cfg.name},W4A8", "--workdir",
          str(tmp_path / "run")]
  assert main(args + sum([["--set", s] for s in sets], [])) == 0, capsys.readouterr().err
  s = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert s["model"] == cfg.name and (s["w_bits"], s["a_bits"]) == (4, 8)
  assert s["candidates_evaluated"] == 2 * 3 * (1 + 1)  # 2 passes over 3 of the 4 units
  assert s["fitness_final"] <= s["fitness_init"] + 1e-5
  assert [h["pass"] for h in s["holdout"]] == [0, 1, 2] and s["holdout_images"] == 8
  history = [json.loads(l) for l in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
  assert [h["unit"] for h in history] == [3, 2, 0] * 2  # last to first, unit 1 skipped
