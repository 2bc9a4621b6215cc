"""Matmuls and row gather. On CPU, tinygrad's default matmul keeps one scalar accumulator per output and runs at ~5
GFLOPS here. Weights are stored as panels [N/8, K, 8] instead: the kernel streams one contiguous panel at a time and
keeps a block of accumulators in registers (~41 GFLOPS per core with float4 loads, ~86 8-wide; one sequence reaches
memory speed). Other devices keep [N, K] and tinygrad's own matmul heuristics. Quantized weights (int8 codes, or 4-bit
GGUF codes two to a byte) use the same kernel with the same panels and a scale (and offset) per 32 along K; on a
GPU-style renderer that kernel has one reduce over K and the workgroups tinygrad's heuristics give x @ W.T. On an x86
CPU with VNNI, quantized weights are stored as int panels and multiplied by int_dot.py's kernel (int8 activations)."""

from tinygrad import Tensor, dtypes
from tinygrad.codegen.opt import Opt, OptOps
from tinygrad.dtype import DType
from tinygrad.uop.ops import AxisType, KernelInfo, Ops, UOp

from . import int_dot
from .opts import accumulators, divisor, has_local, heuristic_on_gpu, upcast, workgroups

PANEL, QBLOCK = 8, 32
DEQUANTIZE_ROWS = 128  # measured: at 128 rows dequantizing first is faster (4-bit prefill 1.3x), at 64 slower


def to_panels(w: Tensor) -> Tensor:
  return w.reshape(w.shape[0] // PANEL, PANEL, w.shape[1]).permute(0, 2, 1).contiguous()


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
  """int8 codes and float scales [N, K/32]: one symmetric scale per 32 weights along K (Q8_0's scheme)."""
  blocks = w.reshape(w.shape[0], -1, QBLOCK)
  scale = blocks.abs().max(-1) / 127
  codes = (blocks / scale.maximum(1e-30).unsqueeze(-1)).round().cast(dtypes.int8)
  return codes.reshape(w.shape), scale


def _code(w: UOp, t: UOp, k: UOp, j: UOp) -> UOp:
  """Weight code k of column j in panel t: a float, an int8, or 4 bits of a uint8 (two codes per byte along K, k even
  in the low nibble); or of int panels (int_dot.py)."""
  if int_dot.is_int_panels(w):
    return int_dot.code(w, t, k, j).cast(dtypes.float32)
  if w.dtype != dtypes.uint8:
    return w[t, k, j].load().cast(dtypes.float32)
  shift = (k % 2 * 4).cast(dtypes.uint8)
  return ((w[t, k // 2, j].load() >> shift) & 15).cast(dtypes.float32)


def _group(w: UOp, scale: tuple[UOp, ...]) -> int:
  """Weights per scale along K: 32, or 16 (GGUF Q6_K), read off the shapes."""
  return int_dot.codes_along_k(w) // scale[0].shape[1]


def _weight(w: UOp, scale: tuple[UOp, ...], t: UOp, k: UOp, j: UOp) -> UOp:
  """The dequantized weight: code * scale (+ offset); int panels' scales and offsets may be float16."""
  value = _code(w, t, k, j)
  if scale:
    value = value * scale[0][t, k // _group(w, scale), j].load().cast(dtypes.float32)
  if len(scale) > 1:
    value = value + scale[1][t, k // _group(w, scale), j].load().cast(dtypes.float32)
  return value


def _panel_matmul(out: UOp, x: UOp, w: UOp, *scale: UOp) -> UOp:
  """out[m, n] = sum_k x[m, k] * weight(n, k). Quantized: scale * sum(x * code) + offset * sum(x) per group (32, or
  16) along K, so the dequantization stays outside the inner loop. A GPU-style renderer gets _panel_matmul_gpu."""
  if has_local():
    return _panel_matmul_gpu(out, x, w, *scale)
  (num_panels, _, P), (M, K) = w.shape, x.shape
  inner = _group(w, scale) if scale else K
  t, m, j = UOp.range(num_panels, 0), UOp.range(M, 1), UOp.range(P, 2)
  kb = UOp.range(K // inner, 3, AxisType.REDUCE) if scale else 0
  ki = UOp.range(inner, 4, AxisType.REDUCE)
  xk = x[m, kb * inner + ki].load().cast(dtypes.float32)
  acc = (xk * _code(w, t, kb * inner + ki, j)).reduce(ki, arg=Ops.ADD)
  if scale:
    block_sum = acc * scale[0][t, kb, j].load()
    if len(scale) > 1:
      block_sum = block_sum + xk.reduce(ki, arg=Ops.ADD) * scale[1][t, kb, j].load()
    acc = block_sum.reduce(kb, arg=Ops.ADD)
  name = f"linear_{M}_{num_panels * P}_{K}"
  store = out.index(m, t * P + j).store(acc.cast(out.dtype)).end(t, m, j)
  return store.sink(arg=KernelInfo(name=name, opts_to_apply=_register_block(num_panels, M, P, K > inner, w.dtype)))


def _register_block(num_panels: int, M: int, P: int, two_reduces: bool, w_dtype: DType) -> tuple[Opt, ...]:
  """rows x panels x 8 columns of accumulators (one FMA chain each); 4-bit: both codes of a byte per step."""
  rows = 4 if M % 4 == 0 else 2 if M % 2 == 0 else 1
  panels = max(d for d in (1, 2, 4) if num_panels % d == 0 and d * rows <= accumulators())
  block = upcast({"panel": num_panels, "row": M, "col": P}, ("col", P), ("row", rows), ("panel", panels))
  if w_dtype == dtypes.uint8:
    block += (Opt(OptOps.UNROLL, int(two_reduces), 2),)
  return block


def _panel_matmul_gpu(out: UOp, x: UOp, w: UOp, *scale: UOp) -> UOp:
  """One reduce over K of x * the dequantized weight (a GPU reads the scales from cache; a reduce inside a reduce
  could not be split over threads)."""
  (num_panels, _, P), (M, K), pairs = w.shape, x.shape, w.dtype == dtypes.uint8
  t, m, j = UOp.range(num_panels, 0), UOp.range(M, 1), UOp.range(P, 2)
  if pairs:  # 4-bit: the two codes of a byte as a range of their own
    ks = UOp.range(K // 2, 3, AxisType.REDUCE), UOp.range(2, 4, AxisType.REDUCE)
    k = ks[0] * 2 + ks[1]
  else:
    ks = (k := UOp.range(K, 3, AxisType.REDUCE),)
  acc = (x[m, k].load().cast(dtypes.float32) * _weight(w, scale, t, k, j)).reduce(*ks, arg=Ops.ADD)
  store = out.index(m, t * P + j).store(acc.cast(out.dtype)).end(t, m, j)
  opts = _matmul_workgroups(num_panels, M, P, K, pairs)
  return store.sink(arg=KernelInfo(name=f"linear_{M}_{num_panels * P}_{K}", opts_to_apply=opts))


def _matmul_workgroups(num_panels: int, M: int, P: int, K: int, pairs: bool) -> tuple[Opt, ...]:
  """tinygrad's heuristics for x @ W.T of the same shape. One row (its matvec): K split over 8 threads, 4 outputs per
  thread, 16 per workgroup. More rows: 4 rows x 4 columns per thread, K unrolled by 4, workgroups over rows and panels
  (up to 128 threads). 4-bit codes: both codes of a byte in one thread."""
  ranges, reduces = {"panel": num_panels, "row": M, "col": P}, {"k": K // 2, "pair": 2} if pairs else {"k": K}
  up, local, unroll = OptOps.UPCAST, OptOps.LOCAL, OptOps.UNROLL
  if M == 1:
    steps = [(unroll, "pair", 2), (OptOps.GROUP, "k", 8), (up, "col", 4), (local, "col", 2), (local, "panel", 2)]
  else:
    rows, k_unroll = divisor(M, 4, 2), [(unroll, "pair", 2), (unroll, "k", 2)] if pairs else [(unroll, "k", 4)]
    steps = [(up, "col", 4), (up, "row", rows), *k_unroll, (local, "col", 2)]
    steps += [(local, "panel", divisor(num_panels, 8, 4, 2)), (local, "row", divisor(M // rows, 8, 4, 2))]
  return workgroups(ranges, reduces, *steps)


def _dequantize(out: UOp, w: UOp, *scale: UOp) -> UOp:
  t, k, j = (UOp.range(n, i) for i, n in enumerate(out.shape))
  opts = heuristic_on_gpu(upcast({"t": out.shape[0]}))
  store = out.index(t, k, j).store(_weight(w, scale, t, k, j)).end(t, k, j)
  return store.sink(arg=KernelInfo(name="dequantize", opts_to_apply=opts))


def linear(x: Tensor, w: Tensor, *scale: Tensor) -> Tensor:
  """x @ W.T for W as [N, K] (tinygrad's matmul) or as panels, float or quantized (with its scales and offsets)."""
  if w.ndim == 2:
    return x @ w.T
  if int_dot.is_int_panels(w):  # CPU with VNNI: int8 activations x codes, faster at every row count measured (1-512)
    return int_dot.int_linear(x, w, *scale)
  if scale and x.shape[0] >= DEQUANTIZE_ROWS:  # many rows (prefill): dequantize once per call, then the float kernel
    dense = Tensor.empty(w.shape[0], x.shape[1], w.shape[2], device=w.device)
    w, scale = dense.custom_kernel(w, *scale, fxn=_dequantize)[0], ()
  out = Tensor.empty(x.shape[0], w.shape[0] * w.shape[2], dtype=x.dtype, device=x.device)
  return out.custom_kernel(x.contiguous(), w, *scale, fxn=_panel_matmul)[0]


def _gather_rows(out: UOp, table: UOp, index: UOp, *scale: UOp) -> UOp:
  i, j = UOp.range(out.shape[0], 0), UOp.range(out.shape[1], 1)
  row = index[i].cast(dtypes.weakint)
  if len(table.shape) == 2:
    value = table[row, j].load()
  else:
    value = _weight(table, scale, row // table.shape[2], j, row % table.shape[2])
  store = out.index(i, j).store(value.cast(out.dtype)).end(i, j)
  opts = heuristic_on_gpu(())
  return store.sink(arg=KernelInfo(name="gather_rows", opts_to_apply=opts))


def gather_rows(table: Tensor, index: Tensor, *scale: Tensor, dtype: DType | None = None) -> Tensor:
  """Rows of a [rows, D] table, or of a [rows/8, D, 8] panel table (quantized ones with their scales), picked by
  index."""
  width = table.shape[1] if len(table.shape) == 2 else int_dot.codes_along_k(table)
  out = Tensor.empty(index.shape[0], width, dtype=dtype or table.dtype, device=table.device)
  return out.custom_kernel(table, index, *scale, fxn=_gather_rows)[0]
