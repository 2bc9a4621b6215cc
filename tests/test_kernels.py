import numpy as np
import pytest
from tinygrad import Tensor, dtypes
from tinyvllm_core.kernels.linear import gather_rows, linear, quantize_int8, to_panels


# The CPU matmul reads weights as [N/8, K, 8] panels with a register block chosen from the row count and the
# panel count; every block shape (and the size-1 ranges the optimizer skips) must give x @ W.T.
@pytest.mark.parametrize("M", [1, 2, 3, 4, 6, 8, 12])
@pytest.mark.parametrize("N,K", [(8, 5), (16, 7), (32, 64), (40, 3), (96, 33)])
def test_panel_linear_matches_numpy(device, M, N, K):
  rng = np.random.default_rng(M * 1000 + N + K)
  x, w = rng.standard_normal((M, K), dtype=np.float32), rng.standard_normal((N, K), dtype=np.float32)
  x_t, w_t = Tensor(x, device=device), Tensor(w, device=device)
  np.testing.assert_allclose(linear(x_t, to_panels(w_t).realize()).numpy(), x @ w.T, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(linear(x_t, w_t).numpy(), x @ w.T, rtol=1e-4, atol=1e-4)  # the [N, K] path GPUs use


def test_gather_rows_reads_panels_like_rows(device):
  table = np.arange(24 * 5, dtype=np.float32).reshape(24, 5)
  index = np.array([0, 7, 8, 23, 9], dtype=np.int32)
  table_t, index_t = Tensor(table, device=device), Tensor(index, device=device)
  np.testing.assert_array_equal(gather_rows(table_t, index_t).numpy(), table[index])
  np.testing.assert_array_equal(gather_rows(to_panels(table_t).realize(), index_t).numpy(), table[index])


@pytest.mark.parametrize("M", [1, 2, 4, 8, 128])  # 128 rows and more: dequantized first, then the float32 kernel
def test_int8_panels_match_their_dequantized_weights(device, M):
  """quantize_int8 keeps one scale per 32 weights along K; the kernel must compute x @ dequant(W).T exactly
  (up to float32 sums), and dequant(W) stays within half a step (scale / 2) of W."""
  rng = np.random.default_rng(M)
  x, w = rng.standard_normal((M, 64), dtype=np.float32), rng.standard_normal((48, 64), dtype=np.float32)
  q, scale = (to_panels(t).realize() for t in quantize_int8(Tensor(w, device=device)))
  qn, sn = (
    q.numpy().transpose(0, 2, 1).reshape(48, 64).astype(np.float32),
    scale.numpy().transpose(0, 2, 1).reshape(48, 2),
  )
  dequant = qn * np.repeat(sn, 32, axis=1)
  assert np.abs(dequant - w).max() <= sn.max() / 2 + 1e-6 and np.abs(qn).max() == 127
  np.testing.assert_allclose(linear(Tensor(x, device=device), q, scale).numpy(), x @ dequant.T, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
    gather_rows(q, Tensor(np.array([0, 47, 9], dtype=np.int32), device=device), scale, dtype=dtypes.float32).numpy(),
    dequant[[0, 47, 9]],
    rtol=1e-6,
  )


@pytest.mark.parametrize("M", [1, 2, 3, 4, 8, 128])
@pytest.mark.parametrize("K", [32, 96])
def test_4bit_panels_match_their_dequantized_weights(device, M, K):
  """GGUF Q4_0 / Q4_1 kept packed: two 4-bit codes per byte along K (k even in the low nibble), weight = code * scale
  + offset per 32 along K; the kernel sums scale * sum(x * code) + offset * sum(x) per block and must equal x @ W.T."""
  rng = np.random.default_rng(M + K)
  codes = rng.integers(0, 16, (48, K)).astype(np.uint8)
  scale, offset = rng.random((48, K // 32), dtype=np.float32), rng.standard_normal((48, K // 32), dtype=np.float32)
  w = (codes.reshape(48, -1, 32) * scale[..., None] + offset[..., None]).reshape(48, K)
  packed = codes[:, 0::2] | codes[:, 1::2] << 4
  q, s, m = (to_panels(Tensor(a, device=device)).realize() for a in (packed, scale, offset))
  x = rng.standard_normal((M, K), dtype=np.float32)
  np.testing.assert_allclose(linear(Tensor(x, device=device), q, s, m).numpy(), x @ w.T, rtol=1e-4, atol=1e-4)
  rows = Tensor(np.array([0, 47, 9, 8], dtype=np.int32), device=device)
  np.testing.assert_allclose(
    gather_rows(q, rows, s, m, dtype=dtypes.float32).numpy(), w[rows.numpy()], rtol=1e-6, atol=1e-6
  )


@pytest.mark.parametrize("backend", ["CPU", "PYTHON"])
def test_masked_exp_and_split_kernels_on_devices_with_and_without_threads(backend, monkeypatch):
  """exp(score - row max) over each row's first context_len scores (softmax before its division); on CPU the kernel
  is split over threads, and a device without threads (tinygrad's PYTHON emulator stands in for GPUs here) must get
  the same kernels unsplit."""
  from tinygrad.helpers import DEV, NUM_CPU_THREADS
  from tinyvllm_core.kernels.attention import _masked_exp

  monkeypatch.setattr(NUM_CPU_THREADS, "value", 2)
  monkeypatch.setattr(DEV, "value", backend)
  rng = np.random.default_rng(0)
  scores, context_lens = rng.standard_normal((4, 2, 8), dtype=np.float32), np.array([1, 3, 8, 5], dtype=np.int32)
  for window in (2**30, 3):  # no sliding window, then the last 3 positions of each row
    inputs = [Tensor(a, device=backend) for a in (scores, context_lens, np.array([window], np.int32))]
    got = Tensor.empty(4, 2, 8, device=backend).custom_kernel(*inputs, fxn=_masked_exp)[0].numpy()
    positions, ends = np.arange(8), context_lens[:, None, None]
    masked = np.where((positions < ends) & (positions >= ends - window), scores, -np.inf)
    want = np.exp(masked - masked.max(-1, keepdims=True))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  x, w = rng.standard_normal((4, 16), dtype=np.float32), rng.standard_normal((32, 16), dtype=np.float32)
  np.testing.assert_allclose(
    linear(Tensor(x, device=backend), to_panels(Tensor(w, device=backend)).realize()).numpy(),
    x @ w.T,
    rtol=1e-4,
    atol=1e-4,
  )


@pytest.mark.parametrize("rows", [1, 8])
def test_custom_kernels_get_workgroups_where_the_renderer_has_local_memory(device, rows, monkeypatch):
  """On a GPU-style renderer (CL here; tinygrad's PYTHON emulator stands in during the CPU pass) no custom kernel of a
  decode step launches single-thread workgroups: the matmuls split K over threads as tinygrad's matvec does, attention
  gets workgroups over positions and head dims, the rest tinygrad's own heuristics. Compiled only, not run."""
  from tinygrad import Device
  from tinygrad.engine.realize import compile_linear
  from tinygrad.helpers import DEV
  from tinyvllm_core.kernels.attention import paged_attention, write_kv

  if not Device[device].renderer.has_local:
    monkeypatch.setattr(DEV, "value", device := "PYTHON")

  def empty(*shape, dtype=dtypes.float32):
    return Tensor.empty(*shape, dtype=dtype, device=device)

  kv = write_kv(
    empty(64, 192, 16), empty(64, 16, 3, 64), empty(rows, 192), empty(rows, 192), empty(rows, dtype="int32")
  )
  tables, lens = empty(rows, 4, dtype="int32"), empty(rows, dtype="int32")
  outs = [*kv, paged_attention(empty(rows, 9, 64), *kv, tables, lens, empty(1, dtype="int32"))]
  outs += [linear(empty(rows, 576), empty(120, 288, 8, dtype="uint8"), empty(120, 18, 8), empty(120, 18, 8))]
  outs += [linear(empty(rows, 1536), empty(72, 1536, 8, dtype="int8"), empty(72, 48, 8))]
  outs += [gather_rows(empty(6144, 288, 8, dtype="uint8"), tables[:, 0], empty(6144, 18, 8), empty(6144, 18, 8))]
  calls = compile_linear(outs[0].linear_with_vars(*outs[1:])[0]).src
  programs = {call.src[0].arg.name: call.src[0].arg.launch_dims({}) for call in calls}
  custom = ["kv_write", "paged_qk", "masked_exp", "paged_pv", "gather_rows", f"linear_{rows}_960_576"]
  for name in [*custom, f"linear_{rows}_576_1536"]:  # 4-bit codes with scales and offsets, int8 codes with scales
    global_size, local_size = programs[name]
    assert local_size is not None and np.prod(local_size) > 1, (name, global_size, local_size)
