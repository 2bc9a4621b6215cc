import numpy as np
import pytest
from tinygrad import Tensor, dtypes
from tinyvllm_core.model import gather_rows, linear, quantize_panels, to_panels

# The CPU matmul reads weights as [N/8, K, 8] panels with a register block chosen from the row count and the
# panel count; every block shape (and the size-1 ranges the optimizer skips) must give x @ W.T.
@pytest.mark.parametrize("M", [1, 2, 3, 4, 6, 8, 12])
@pytest.mark.parametrize("N,K", [(8, 5), (16, 7), (32, 64), (40, 3), (96, 33)])
def test_panel_linear_matches_numpy(M, N, K):
  rng = np.random.default_rng(M * 1000 + N + K)
  x, w = rng.standard_normal((M, K), dtype=np.float32), rng.standard_normal((N, K), dtype=np.float32)
  y = linear(Tensor(x), to_panels(Tensor(w)).realize()).numpy()
  np.testing.assert_allclose(y, x @ w.T, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(linear(Tensor(x), Tensor(w)).numpy(), x @ w.T, rtol=1e-4, atol=1e-4)  # the [N, K] path other devices use

def test_gather_rows_reads_panels_like_rows():
  table = np.arange(24 * 5, dtype=np.float32).reshape(24, 5)
  index = np.array([0, 7, 8, 23, 9], dtype=np.int32)
  np.testing.assert_array_equal(gather_rows(Tensor(table), Tensor(index)).numpy(), table[index])
  np.testing.assert_array_equal(gather_rows(to_panels(Tensor(table)).realize(), Tensor(index)).numpy(), table[index])

@pytest.mark.parametrize("M", [1, 2, 4, 8])
def test_int8_panels_match_their_dequantized_weights(M):
  """quantize_panels keeps one scale per 32 weights along K; the kernel must compute x @ dequant(W).T exactly
  (up to float32 sums), and dequant(W) stays within half a step (scale / 2) of W."""
  rng = np.random.default_rng(M)
  x, w = rng.standard_normal((M, 64), dtype=np.float32), rng.standard_normal((48, 64), dtype=np.float32)
  q, scale = quantize_panels(Tensor(w))
  qn, sn = q.numpy().transpose(0, 2, 1).reshape(48, 64).astype(np.float32), scale.numpy().transpose(0, 2, 1).reshape(48, 2)
  dequant = qn * np.repeat(sn, 32, axis=1)
  assert np.abs(dequant - w).max() <= sn.max() / 2 + 1e-6 and np.abs(qn).max() == 127
  np.testing.assert_allclose(linear(Tensor(x), q, scale).numpy(), x @ dequant.T, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gather_rows(q, Tensor(np.array([0, 47, 9], dtype=np.int32)), scale, dtypes.float32).numpy(), dequant[[0, 47, 9]], rtol=1e-6)
