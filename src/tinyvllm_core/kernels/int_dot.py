"""Integer dot products for quantized weights on the CPU (x86 with AVX-VNNI or AVX512-VNNI, tinygrad's clang renderer),
as llama.cpp multiplies its Q8 activations: each activation row is quantized to int8 blocks of 32 with one float scale
(quantize_rows), and a block of 32 codes x 32 activations is summed in int32 by `vpdpbusd` (4 unsigned bytes x 4
signed bytes per 32-bit lane), then scaled once per block: out += weight scale x activation scale x int sum + offset x
activation scale x sum(codes).

clang does not find vpdpbusd in tinygrad's scalar C (its vectorizer picks vpmaddwd on zero-extended lanes, no faster
than the float kernel), so the int32 block sum of one panel is a C statement expression in a CUSTOM UOp; tinygrad
keeps the loops, the thread split and the float side. The weights take a layout of their own ("int panels"), where a
32-bit lane holds 4 codes along K of one column, so one 32-byte load is 8 columns x 4 codes:
- 4-bit codes (Q4_0, Q4_1, Q4_K): uint8 [N/8, K/8, 8, 4], byte (t, g, j, b) = code(8t+j, 8g+b) | code(8t+j, 8g+4+b)
  << 4;
- 8-bit codes (Q8_0, Q5_x, Q5_K, int8): int8 [N/8, K/4, 8, 4] holding code + 128 (code ^ 0x80), so the bytes are
  unsigned for vpdpbusd; the kernel takes 128 x scale x sum(quantized x) back off per block.
linear.py reads that layout too (dequantize for prefill, row gather for a tied embedding)."""

import functools
import os
import platform

import numpy as np
from tinygrad import Device, Tensor, dtypes
from tinygrad.uop.ops import AxisType, KernelInfo, Ops, UOp

from .opts import upcast

QBLOCK, PANEL = 32, 8
ACCUMULATORS = 8  # panels x rows per register block: 2 int32 + 1 float ymm each, of 32 registers


@functools.cache
def _cpu_has_vnni() -> bool:
  if platform.machine().lower() not in ("x86_64", "amd64"):
    return False
  try:
    flags = next((line.split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
  except OSError:
    return False
  return "avx_vnni" in flags or {"avx512_vnni", "avx512vl"} <= set(flags)


def available() -> bool:
  """The int kernels render as clang C with x86 VNNI builtins: tinygrad's CPU device with its clang renderer on a CPU
  that has VNNI. TINYVLLM_INT_DOT=0 turns them off (the float kernels then read the usual panels)."""
  if os.environ.get("TINYVLLM_INT_DOT", "1") == "0" or Device.DEFAULT.split(":")[0] != "CPU":
    return False
  return type(Device[Device.DEFAULT].renderer).__name__ == "ClangRenderer" and _cpu_has_vnni()


def is_int_panels(w: Tensor | UOp) -> bool:
  return len(w.shape) == 4


def codes_along_k(w: Tensor | UOp) -> int:
  """K of a weight in any panel layout: floats or int8 [N/8, K, 8], 4-bit [N/8, K/2, 8], int panels [N/8, K/8 or K/4,
  8, 4]."""
  if is_int_panels(w):
    return w.shape[1] * (8 if w.dtype == dtypes.uint8 else 4)
  return w.shape[1] * (2 if w.dtype == dtypes.uint8 else 1)


def code(w: UOp, t: UOp, k: UOp, j: UOp) -> UOp:
  """Code k of column j in panel t of int panels (an int32)."""
  if w.dtype == dtypes.uint8:
    shift = (k // 4 % 2 * 4).cast(dtypes.uint8)
    return ((w[t, k // 8, j, k % 4].load() >> shift) & 15).cast(dtypes.int32)
  return (w[t, k // 4, j, k % 4].load() ^ -128).cast(dtypes.int8).cast(dtypes.int32)


def int_panels(codes: Tensor | np.ndarray) -> Tensor:
  """[N, K] int8 codes, or [N, K/2] uint8 with two 4-bit codes per byte (k even in the low nibble), as int panels."""
  c = codes.numpy() if isinstance(codes, Tensor) else np.asarray(codes)
  N, K = c.shape[0], c.shape[1] * (2 if c.dtype == np.uint8 else 1)
  if c.dtype == np.uint8:  # 4-bit
    c = np.stack([c & 15, c >> 4], -1).reshape(N // PANEL, PANEL, K // 8, 2, 4)  # t j g half b
    return Tensor(np.ascontiguousarray((c[:, :, :, 0] | c[:, :, :, 1] << 4).transpose(0, 2, 1, 3)))
  biased = (c.astype(np.int8) ^ np.int8(-128)).reshape(N // PANEL, PANEL, K // 4, 4)
  return Tensor(np.ascontiguousarray(biased.transpose(0, 2, 1, 3)))


def wanted(codes: Tensor | np.ndarray, scale: Tensor | np.ndarray) -> bool:
  """Int panels for this weight: the int kernels are available and it has one scale per 32 codes along K (Q6_K's 16
  stay float)."""
  K = codes.shape[1] * (2 if codes.dtype in (dtypes.uint8, np.uint8) else 1)
  return available() and codes.shape[0] % PANEL == 0 and K == QBLOCK * scale.shape[1]


def _round(v: UOp) -> UOp:
  """Half away from zero, as llama.cpp's roundf."""
  return (v + (v < 0).where(-0.5, 0.5)).cast(dtypes.int32)


def _quantize_rows(xq: UOp, xs: UOp, xqsum: UOp, x: UOp) -> UOp:
  """Per row and block of 32: scale = max|x| / 127, codes = round(x / scale) in int8, and scale x sum(codes)."""
  M, K = x.shape
  m, b = UOp.range(M, 0), UOp.range(K // QBLOCK, 1)
  i, i2, i3 = UOp.range(QBLOCK, 2, AxisType.REDUCE), UOp.range(QBLOCK, 3), UOp.range(QBLOCK, 4, AxisType.REDUCE)

  def value(k: UOp) -> UOp:
    return x[m, b * QBLOCK + k].load().cast(dtypes.float32)

  amax = value(i).abs().reduce(i, arg=Ops.MAX)
  scale, inverse = amax / 127, (amax > 0).where(127 / amax.maximum(1e-30), 0.0)
  qsum = _round(value(i3) * inverse).reduce(i3, arg=Ops.ADD)
  stores = [
    xq.index(m, b * QBLOCK + i2).store(_round(value(i2) * inverse).cast(dtypes.int8)).end(i2),
    xs.index(m, b).store(scale),
    xqsum.index(m, b).store(qsum.cast(dtypes.float32) * scale),
  ]
  return UOp.group(*stores).end(m, b).sink(arg=KernelInfo(name=f"quantize_rows_{M}_{K}", opts_to_apply=()))


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
  """int8 codes [M, K], and per block of 32: the scale and scale x sum(codes) [M, K/32]."""
  M, K = x.shape
  outs = [Tensor.empty(M, K, dtype=dtypes.int8, device=x.device)]
  outs += [Tensor.empty(M, K // QBLOCK, device=x.device) for _ in range(2)]
  return tuple(Tensor.custom_kernel(*outs, x.contiguous(), fxn=_quantize_rows)[:3])


_TYPES = (
  "typedef int v8i __attribute__((vector_size(32)));"
  " typedef unsigned char v32u __attribute__((vector_size(32), aligned(1)));"
)
# {0}: the panel's 32-code block (4 or 8 rows of [8, 4] bytes), {1}: the row's 32 int8 activations; two chains of
# vpdpbusd (lanes: 8 columns); [LANE] is the column. Identical expressions for the 8 columns are one after clang's CSE.
_DOT = {
  4: f"({{{{ {_TYPES} const unsigned char* wp = (const unsigned char*){{0}}; const signed char* xp = {{1}};"
  " v8i a = {{0}}, b = {{0}}; for (int g = 0; g < 4; g++) {{ v32u v = *(const v32u*)(wp + 32*g); int x0, x1;"
  " __builtin_memcpy(&x0, xp + 8*g, 4); __builtin_memcpy(&x1, xp + 8*g + 4, 4);"
  " a = __builtin_ia32_vpdpbusd256(a, (v8i)(v & 15), (v8i){{0}} + x0);"
  " b = __builtin_ia32_vpdpbusd256(b, (v8i)(v >> 4), (v8i){{0}} + x1); }} (a + b)[LANE]; }})",
  8: f"({{{{ {_TYPES} const unsigned char* wp = (const unsigned char*){{0}}; const signed char* xp = {{1}};"
  " v8i a = {{0}}, b = {{0}}; for (int g = 0; g < 8; g += 2) {{ int x0, x1;"
  " __builtin_memcpy(&x0, xp + 4*g, 4); __builtin_memcpy(&x1, xp + 4*g + 4, 4);"
  " a = __builtin_ia32_vpdpbusd256(a, (v8i)*(const v32u*)(wp + 32*g), (v8i){{0}} + x0);"
  " b = __builtin_ia32_vpdpbusd256(b, (v8i)*(const v32u*)(wp + 32*g + 32), (v8i){{0}} + x1); }} (a + b)[LANE]; }})",
}


# The 8 float16 scales (or offsets) of a panel's columns at one block, converted at once (one vcvtph2ps), then column
# LANE; identical expressions for the 8 columns are one after clang's CSE. Loaded and cast one by one, clang 19
# converted them 4 at a time and spilled registers in the 4-row x 2-panel block: 14% slower at 32 rows than float32
# scales (this: as fast).
_HALVES = (
  "({{ typedef __fp16 v8h __attribute__((vector_size(16), aligned(2)));"
  " typedef float v8f __attribute__((vector_size(32))); __builtin_convertvector(*(const v8h*){0}, v8f)[LANE]; }})"
)


def _pointer(index: UOp) -> UOp:
  """An element's address for C code (a void CUSTOMI has no shape, so the buffer's shape does not spread)."""
  return UOp(Ops.CUSTOMI, dtypes.void, src=(index,), arg="{0}")


def _column(values: UOp, panel: UOp, kb: UOp, j: int) -> UOp:
  """Column j's scale or offset at block kb as a float32, stored as float16 or float32 (formats/weights.py)."""
  if values.dtype != dtypes.float16:
    return values[panel, kb, j].load()
  lane = _HALVES.replace("LANE", str(j))
  return UOp(Ops.CUSTOM, dtypes.float32, src=(_pointer(values.index(panel, kb, 0)), kb), arg=lane)


def _int_matmul(out: UOp, xq: UOp, xs: UOp, w: UOp, scale: UOp, *extra: UOp) -> UOp:
  """out[m, n] = sum over blocks of scale(n) x xs(m) x isum + (offset(n) - 128 x scale(n) for biased 8-bit codes) x
  xs(m) x sum(codes)(m): the float dot product of the dequantized weights with the dequantized activations (an offset
  times the quantized activations' sum, as llama.cpp's Q8_1, so that Q4_0's offset -8 x scale cancels exactly as its
  centred codes would). Scale and offset are float16 where their values are (formats/weights.py), else float32.
  extra: the offset if any, then xs x sum(codes); only buffers the kernel reads are passed (tinygrad names the thread
  index after the buffer count, so an unread buffer shifts the arguments). A register block of panels x rows is
  unrolled here (tinygrad's UPCAST does not copy a CUSTOM per lane); the panel groups are split over the CPU's
  threads."""
  (num_panels, *_), (M, K) = w.shape, xq.shape
  bits, rows_per_block = (4, QBLOCK // 8) if w.dtype == dtypes.uint8 else (8, QBLOCK // 4)
  offset, xqsum = (extra[0] if len(extra) == 2 else None), (extra[-1] if extra else None)
  rows = max(d for d in (1, 2, 4) if M % d == 0)
  panels = max(d for d in (1, 2, 4, 8) if num_panels % d == 0 and d * rows <= ACCUMULATORS)
  t, m = UOp.range(num_panels // panels, 0), UOp.range(M // rows, 1)
  kb = UOp.range(K // QBLOCK, 2, AxisType.REDUCE)
  stores = []
  for r in range(rows):
    row = m * rows + r
    x_block, x_scale = _pointer(xq.index(row, kb * QBLOCK)), xs[row, kb].load()
    for p in range(panels):
      panel = t * panels + p
      w_block = _pointer(w.index(panel, kb * rows_per_block, 0, 0))
      for j in range(PANEL):
        isum = UOp(Ops.CUSTOM, dtypes.int32, src=(w_block, x_block, kb), arg=_DOT[bits].replace("LANE", str(j)))
        s = _column(scale, panel, kb, j)
        value = isum.cast(dtypes.float32) * (s * x_scale)
        if xqsum is not None:
          bias = (_column(offset, panel, kb, j) if offset is not None else 0.0) - (s * 128 if bits == 8 else 0.0)
          value = value + bias * xqsum[row, kb].load()
        stores.append(out.index(row, panel * PANEL + j).store(value.reduce(kb, arg=Ops.ADD)))
  opts = upcast({"group": num_panels // panels, "row": M // rows})
  name = f"linear_{M}_{num_panels * PANEL}_{K}"  # as the float kernel: bench profile sorts matmuls by this name
  return UOp.group(*stores).end(t, m).sink(arg=KernelInfo(name=name, opts_to_apply=opts))


def int_linear(x: Tensor, w: Tensor, scale: Tensor, *offset: Tensor) -> Tensor:
  """x @ W.T for W as int panels with a scale (and an offset) per 32 along K; x is quantized per row first."""
  xq, xs, xqsum = quantize_rows(x)
  extra = [*offset, xqsum] if offset or w.dtype != dtypes.uint8 else []
  out = Tensor.empty(x.shape[0], w.shape[0] * PANEL, dtype=x.dtype, device=x.device)
  return out.custom_kernel(xq, xs, w, scale, *extra, fxn=_int_matmul)[0]
