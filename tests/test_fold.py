"""BatchNorm folding equals running the layer and the BatchNorm apart."""
import numpy as np

from evolq_jax.models.fold import fold_bn_after, fold_bn_before


def _bn(x, g, b, m, v, eps=1e-5):
  return (x - m) / np.sqrt(v + eps) * g + b


def test_fold_after_and_before_a_dense_layer():
  r = np.random.default_rng(0)
  x, k, bias = r.standard_normal((5, 4)), r.standard_normal((4, 3)), r.standard_normal(3)
  stats3 = [r.standard_normal(3), r.standard_normal(3), r.standard_normal(3), r.random(3) + 0.5]
  kf, bf = fold_bn_after(k, bias, *stats3)
  np.testing.assert_allclose(x @ kf + bf, _bn(x @ k + bias, *stats3), rtol=1e-5, atol=1e-5)
  kf, bf = fold_bn_after(k, None, *stats3)  # a conv without bias
  np.testing.assert_allclose(x @ kf + bf, _bn(x @ k, *stats3), rtol=1e-5, atol=1e-5)
  stats4 = [r.standard_normal(4), r.standard_normal(4), r.standard_normal(4), r.random(4) + 0.5]
  kf, bf = fold_bn_before(k, bias, *stats4)
  np.testing.assert_allclose(x @ kf + bf, _bn(x, *stats4) @ k + bias, rtol=1e-5, atol=1e-5)


def test_fold_after_a_conv_kernel_scales_the_output_channel():
  r = np.random.default_rng(1)
  k = r.standard_normal((3, 3, 1, 8))  # depthwise: (kh, kw, 1, channels)
  stats = [r.standard_normal(8), r.standard_normal(8), r.standard_normal(8), r.random(8) + 0.5]
  kf, _ = fold_bn_after(k, None, *stats)
  np.testing.assert_allclose(kf, k * stats[0] / np.sqrt(stats[3] + 1e-5), rtol=1e-6)
