"""What the speed scripts share: the benchmark's quant setting, timing and memory
probes, FLOPs (models/cost.py), the full-forward loss of one candidate, result records."""
from __future__ import annotations

import os
import threading
import time

import jax
import jax.numpy as jnp

from evolq_jax.config import QuantConfig
from evolq_jax.losses import get_loss
from evolq_jax.models import quantized_logits
from evolq_jax.models.cost import forward_flops  # noqa: F401 (the benchmarks' FLOP count)
from evolq_jax.search import set_scales

QCFG = QuantConfig(w_bits=4, a_bits=8, a_observer="minmax")
TEMPERATURE = 3.0


# --- measuring ------------------------------------------------------------------

class PeakRSS:
  """Peak resident memory (MiB above the start) while the block runs, sampled."""

  @staticmethod
  def rss() -> int:
    with open("/proc/self/statm") as f:  # Linux; pages
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

  def __enter__(self):
    self.stop = threading.Event()
    self.start = self.peak = self.rss()
    self.thread = threading.Thread(target=self._sample, daemon=True)
    self.thread.start()
    return self

  def _sample(self):
    while not self.stop.wait(0.005):
      self.peak = max(self.peak, self.rss())

  def __exit__(self, *exc):
    self.stop.set()
    self.thread.join()
    self.mib = (self.peak - self.start) / 2 ** 20


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
  """GFLOP/s of the best of `reps` jitted n x n fp32 matmuls."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = min(timed(lambda: f(a, a).block_until_ready()) for _ in range(reps))
  return 2 * n ** 3 / best / 1e9


def timed(fn):
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def xla_mib(compiled) -> float:
  m = compiled.memory_analysis()
  if m is None:
    return float("nan")
  return (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes) / 2 ** 20


def device_peak_mib():
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use", 0) / 2 ** 20 or None


# --- FLOPs (analytic) -----------------------------------------------------------



def full_loss_fn(cfg, block, layout, loss_batch, qcfg=QCFG):
  """f(vec, params, qparams, images, fp_ref): one candidate's loss with the full quantized
  forward (every weight re-quantized). Arrays are arguments, not constants, so XLA
  cannot fold the weight quantization at compile time."""
  loss = get_loss("infonce")

  def f(vec, params, qparams, images, fp_ref):
    n = images.shape[0] // loss_batch
    xs = images[:n * loss_batch].reshape((n, loss_batch) + images.shape[1:])
    ks = fp_ref[:n * loss_batch].reshape(n, loss_batch, -1)
    qp = set_scales(qparams, vec, layout)
    return jnp.mean(jax.lax.map(
        lambda a: loss(quantized_logits(cfg, qcfg, params, qp, a[0]), a[1], TEMPERATURE),
        (xs, ks)))
  return f



def population(vec0, k, seed):
  noise = jax.random.uniform(jax.random.key(seed), (k, vec0.shape[0]), minval=0.98, maxval=1.02)
  return vec0[None] * noise



def mode_record(seconds, n_cand, flops_per_cand, peak, rss_mib, xla, compile_s, **extra):
  per = seconds / n_cand
  return {"seconds_per_candidate": per, "candidates_per_second": 1 / per,
          "candidates_timed": n_cand, "gflop_per_candidate": flops_per_cand / 1e9,
          "gflop_s": flops_per_cand / per / 1e9, "fraction_of_peak": flops_per_cand / per / 1e9 / peak,
          "peak_rss_mib": rss_mib, "xla_buffers_mib": xla, "compile_s": compile_s, **extra}
