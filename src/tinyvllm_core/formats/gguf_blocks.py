"""GGUF quantized blocks kept as stored (memory-mapped) and unpacked into what the matmul kernels read: codes
[rows, K] and, per group of 32 (16 for Q6_K) along K, a scale and an offset; weight = code * scale (+ offset).

Q4_0, Q4_1 and Q4_K have 4-bit codes (packed two to a byte for the kernels); Q5_0, Q5_1, Q5_K, Q6_K and Q8_0 keep
their codes as int8. The bit layouts are ggml's (ggml-quants.c dequantize_row_*)."""

from dataclasses import dataclass

import numpy as np

# ggml type -> block layout; K-quants (types 12-14) are super-blocks of 256
GGUF_BLOCKS = {
  2: np.dtype([("d", "<f2"), ("qs", "u1", 16)]),  # Q4_0
  3: np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)]),  # Q4_1
  6: np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)]),  # Q5_0
  7: np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)]),  # Q5_1
  8: np.dtype([("d", "<f2"), ("qs", "i1", 32)]),  # Q8_0
  12: np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)]),  # Q4_K
  13: np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qh", "u1", 32), ("qs", "u1", 128)]),  # Q5_K
  14: np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")]),  # Q6_K
}
GGUF_TYPE_NAMES = {2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}
GGUF_BLOCK_ELEMENTS = {kind: 256 if kind >= 12 else 32 for kind in GGUF_BLOCKS}  # weights along K per block
_BLOCK_ELEMENTS = {GGUF_BLOCKS[kind]: n for kind, n in GGUF_BLOCK_ELEMENTS.items()}


@dataclass
class Unpacked:
  """Blocks of different types fused into one matrix (q/k/v of a Q4_K_M file mixes Q4_K and Q6_K): int8 codes and a
  scale and an offset per group, the smallest group of the parts."""

  codes: np.ndarray
  scales: np.ndarray
  offsets: np.ndarray

  @property
  def shape(self) -> tuple[int, ...]:
    return self.codes.shape

  def __len__(self) -> int:
    return len(self.codes)


def is_blocks(w) -> bool:
  return isinstance(w, Unpacked) or (isinstance(w, np.ndarray) and w.dtype.names is not None)


def fuse_blocks(parts: list[np.ndarray]) -> Unpacked:
  """Rows of blocks of different types as one matrix the same kernels read, without a float copy."""
  unpacked = [unpack_blocks(p) for p in parts]
  group = min(codes.shape[1] // scales.shape[1] for codes, scales, _ in unpacked)

  def regroup(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None):
    repeat = codes.shape[1] // scales.shape[1] // group
    offsets = np.zeros_like(scales) if offsets is None else offsets
    return codes.astype(np.int8), np.repeat(scales, repeat, 1), np.repeat(offsets, repeat, 1)

  codes, scales, offsets = zip(*(regroup(*u) for u in unpacked))
  return Unpacked(np.concatenate(codes), np.concatenate(scales), np.concatenate(offsets))


def block_elements(blocks: np.ndarray) -> int:
  """Weights per block along K (per stored element: 1 for Unpacked)."""
  return 1 if isinstance(blocks, Unpacked) else _BLOCK_ELEMENTS[blocks.dtype]


def _f32(x: np.ndarray) -> np.ndarray:
  return np.asarray(x, np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
  """[..., 16] bytes -> [..., 32] codes: the low nibbles are elements 0-15, the high ones 16-31."""
  return np.concatenate([qs & 15, qs >> 4], -1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
  """Q5_0 / Q5_1: bit j of the 32-bit qh is the fifth bit of element j."""
  return (((qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4)."""
  q = scales.astype(np.uint8)
  low_scale, low_min = q[..., 0:4] & 63, q[..., 4:8] & 63
  high_scale = (q[..., 8:12] & 15) | ((q[..., 0:4] >> 6) << 4)
  high_min = (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)
  return np.concatenate([low_scale, high_scale], -1), np.concatenate([low_min, high_min], -1)


def _k_codes(qs: np.ndarray) -> np.ndarray:
  """Q4_K / Q5_K: 128 bytes -> 256 four-bit codes; 64 elements per 32 bytes, low nibbles first."""
  chunks = qs.reshape(*qs.shape[:-1], 4, 1, 32)
  return np.concatenate([chunks & 15, chunks >> 4], -2).reshape(*qs.shape[:-1], 256)


def _q6_k_codes(ql: np.ndarray, qh: np.ndarray) -> np.ndarray:
  """Q6_K: 4 low bits from ql, 2 high bits from qh, in two halves of 128 elements; codes - 32."""
  ql = ql.reshape(*ql.shape[:-1], 2, 2, 32)  # half, (bytes 0-31, 32-63), l
  qh = qh.reshape(*qh.shape[:-1], 2, 1, 32)
  low = np.stack([ql[..., 0, :] & 15, ql[..., 1, :] & 15, ql[..., 0, :] >> 4, ql[..., 1, :] >> 4], -2)
  high = (qh >> (np.arange(4, dtype=np.uint8)[:, None] * 2)) & 3  # [..., 2, 4, 32]
  codes = (low | (high << 4)).astype(np.int16) - 32
  return codes.reshape(*ql.shape[:-3], 256).astype(np.int8)


def unpack_blocks(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """[N, K / block] blocks -> codes [N, K] (int8, or uint8 0..15 for 4-bit types), scales [N, groups] and offsets
  [N, groups] (None when there are none); a group is 32 weights along K (16 for Q6_K)."""
  if isinstance(blocks, Unpacked):
    return blocks.codes, blocks.scales, blocks.offsets
  names = blocks.dtype.names
  n = len(blocks)
  if "ql" in names:  # Q6_K
    scales = _f32(blocks["d"])[..., None] * _f32(blocks["scales"])
    return _q6_k_codes(blocks["ql"], blocks["qh"]).reshape(n, -1), scales.reshape(n, -1), None
  if "dmin" in names:  # Q4_K, Q5_K
    sc, mn = _k_scales(blocks["scales"])
    codes = _k_codes(blocks["qs"])
    if "qh" in names:  # Q5_K: the fifth bit of element 64c + 32h + l is bit 2c + h of qh[l]
      bits = (blocks["qh"][..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # [..., 8, 32]
      codes = (codes.reshape(*codes.shape[:-1], 8, 32) | (bits << 4)).reshape(*codes.shape).astype(np.int8)
    scales = _f32(blocks["d"])[..., None] * sc
    offsets = -_f32(blocks["dmin"])[..., None] * mn
    return codes.reshape(n, -1), scales.reshape(n, -1), offsets.reshape(n, -1)
  d = _f32(blocks["d"])
  if "qh" in names:  # Q5_0, Q5_1: codes 0..31
    codes = _nibbles(blocks["qs"]) | _high_bits(blocks["qh"])
    if "m" in names:
      return codes.reshape(n, -1).astype(np.int8), d, _f32(blocks["m"])
    return (codes.astype(np.int16) - 16).astype(np.int8).reshape(n, -1), d, None
  if blocks["qs"].dtype == np.int8:  # Q8_0
    return np.array(blocks["qs"]).reshape(n, -1), d, None
  offsets = _f32(blocks["m"]) if "m" in names else -8 * d  # Q4_1, Q4_0
  return _nibbles(blocks["qs"]).reshape(n, -1), d, offsets


def dequantize(w: np.ndarray) -> np.ndarray:
  """float32 weights of blocks (anything else as it is)."""
  if not is_blocks(w):
    return w
  codes, scales, offsets = unpack_blocks(w)
  groups = codes.reshape(len(w), scales.shape[1], -1).astype(np.float32) * scales[..., None]
  if offsets is not None:
    groups = groups + offsets[..., None]
  return groups.reshape(len(w), -1).astype(np.float32)
