"""Mode (e) of speed.py, the reference's way in PyTorch eager: timm's model with
every nn.Linear's weight fake-quantized per channel and its input per tensor on
each call, one candidate at a time. Timed per candidate (`time_candidates`) and
as a whole search at the paper's budget (`search_end_to_end`: the reference's
tournament, block by block, last to first)."""
from __future__ import annotations

import contextlib
import os
import time

import numpy as np
from speed_common import QCFG, TEMPERATURE, PeakRSS, forward_flops, mode_record


def import_timm():
  import torch
  for op in ("nms", "qnms"):
    with contextlib.suppress(Exception):  # already defined
      torch.library.define(f"torchvision::{op}",
                           "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  import timm
  return torch, timm


def build_reference(cfg, images_nhwc, loss_batch, qcfg=QCFG):
  """-> dict: the quantized timm model, its Linear wrappers, the loss batches, FP logits,
  and score() = the infoNCE loss of the current scales on every batch."""
  torch, timm = import_timm()
  nn, fn = torch.nn, torch.nn.functional
  torch.set_num_threads(os.cpu_count())
  w_levels, a_levels = 2 ** qcfg.w_bits - 1, 2 ** qcfg.a_bits - 1

  def fake(x, scale, zp, levels):
    return (torch.clamp(torch.round(x / scale) + zp, 0, levels) - zp) * scale

  def minmax(lo, hi, levels):
    lo, hi = torch.clamp(lo, max=0), torch.clamp(hi, min=0)
    scale = torch.clamp((hi - lo) / levels, min=1e-8)
    return scale, torch.round(-lo / scale)

  class QLinear(nn.Module):
    def __init__(self, lin):
      super().__init__()
      self.weight, self.bias = lin.weight, lin.bias
      w = lin.weight.detach()
      self.w_scale, self.w_zp = minmax(w.min(1).values, w.max(1).values, w_levels)
      self.x_scale = self.x_zp = None
      self.lo, self.hi = torch.tensor(0.0), torch.tensor(0.0)

    def forward(self, x):
      if self.x_scale is None:  # calibration pass: record the input range
        self.lo, self.hi = torch.minimum(self.lo, x.min()), torch.maximum(self.hi, x.max())
        return fn.linear(x, self.weight, self.bias)
      xq = fake(x, self.x_scale, self.x_zp, a_levels)
      wq = fake(self.weight, self.w_scale[:, None], self.w_zp[:, None], w_levels)
      return fn.linear(xq, wq, self.bias)

  from timm.models.vision_transformer import VisionTransformer
  torch.manual_seed(0)
  model = VisionTransformer(img_size=cfg.img_size, patch_size=cfg.patch_size,
                            in_chans=cfg.in_chans, num_classes=cfg.num_classes,
                            embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                            mlp_ratio=cfg.mlp_ratio).eval()  # = timm's deit_* for the presets
  qlins = {}
  for mod_name, mod in list(model.named_modules()):
    for child, sub in list(mod.named_children()):
      if isinstance(sub, nn.Linear):
        q = QLinear(sub)
        setattr(mod, child, q)
        qlins[f"{mod_name}.{child}".lstrip(".")] = q
  x = torch.from_numpy(np.asarray(images_nhwc)).permute(0, 3, 1, 2).contiguous()
  batches = list(torch.split(x, loss_batch))[:len(x) // loss_batch]
  with torch.no_grad():
    fp = [model(xb) for xb in batches]  # FP logits, once (the Linear calibration pass too)
  for q in qlins.values():
    q.x_scale, q.x_zp = minmax(q.lo, q.hi, a_levels)

  def info_nce(q, k):
    sim = fn.normalize(q, dim=-1) @ fn.normalize(k, dim=-1).T / TEMPERATURE
    return 2 * TEMPERATURE * fn.cross_entropy(sim, torch.arange(len(q)))

  def score():
    with torch.no_grad():
      return float(torch.stack([info_nce(model(xb), k) for xb, k in zip(batches, fp)]).mean())

  return {"torch": torch, "timm": timm, "model": model, "qlins": qlins, "score": score,
          "images": len(batches) * loss_batch}


def _searched(ref, block: int):
  return [ref["qlins"][f"blocks.{block}.attn.qkv"], ref["qlins"][f"blocks.{block}.attn.proj"]]


def time_candidates(cfg, ref, n_cand, peak, log):
  """Per-candidate seconds: block 0's qkv/proj scales perturbed, the model scored."""
  torch = ref["torch"]
  searched = _searched(ref, 0)
  base = [q.w_scale.clone() for q in searched]
  gen = torch.Generator().manual_seed(0)

  def one_candidate():
    for q, s in zip(searched, base):
      q.w_scale = s * (0.98 + 0.04 * torch.rand(s.shape, generator=gen))
    return ref["score"]()

  one_candidate()  # warm-up
  with PeakRSS() as m:
    t = time.perf_counter()
    fits = [one_candidate() for _ in range(n_cand)]
    secs = time.perf_counter() - t
  for q, s in zip(searched, base):
    q.w_scale = s
  flops = forward_flops(cfg) * ref["images"]
  rec = mode_record(secs, n_cand, flops, peak, m.mib, float("nan"), 0.0,
                    torch_version=torch.__version__, timm_version=ref["timm"].__version__,
                    threads=torch.get_num_threads(), fitness=fits)
  log(f"(e) {rec['seconds_per_candidate']:.3f} s/candidate")
  return rec


def search_end_to_end(cfg, ref, passes, generations, radius, pool=15, tournament=10, seed=0):
  """The reference's search, measured: per block (last to first), score the current
  scales, then `generations` cycles of tournament -> one child |parent + U(-r, r)| ->
  score -> drop the worst; keep the best. -> seconds, evaluations, fitness."""
  torch = ref["torch"]
  rng = np.random.default_rng(seed)
  t = time.perf_counter()
  evals, f_start = 0, None
  for _ in range(passes):
    for b in reversed(range(cfg.depth)):
      searched = _searched(ref, b)
      sizes = [q.w_scale.numel() for q in searched]
      vec0 = torch.cat([q.w_scale for q in searched])

      def set_vec(v):
        for q, part in zip(searched, torch.split(v, sizes)):
          q.w_scale = part

      f0 = ref["score"]()
      evals += 1
      f_start = f0 if f_start is None else f_start
      pop, fit = [vec0] * pool, [f0] * pool
      for _ in range(generations):
        draw = rng.integers(0, len(pop), tournament)
        parent = pop[min(draw, key=lambda i: fit[i])]
        noise = torch.from_numpy(rng.uniform(-radius, radius, parent.shape).astype(np.float32))
        child = torch.abs(parent + noise)
        set_vec(child)
        pop.append(child)
        fit.append(ref["score"]())
        evals += 1
        worst = int(np.argmax(fit))
        pop.pop(worst)
        fit.pop(worst)
      set_vec(pop[int(np.argmin(fit))])
  return {"seconds": time.perf_counter() - t, "candidate_evaluations": evals,
          "fitness_start": f_start, "fitness_final": ref["score"](),
          "torch_threads": torch.get_num_threads()}
