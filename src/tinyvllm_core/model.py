from __future__ import annotations
import functools, os, re
import numpy as np
from tinygrad import Device, Tensor, dtypes
from tinygrad.dtype import DType
from tinygrad.helpers import NUM_CPU_THREADS, getenv
from tinygrad.uop.ops import UOp, Ops, KernelInfo, AxisType
from tinygrad.codegen.opt import Opt, OptOps
from .config import ModelConfig

# Paged KV write and attention as small UOp kernels: they read through the block table instead of
# materialising a gather, and write only the new slots (a tensor-index setitem rewrites the whole pool).

def _kv_write(k_pool: UOp, v_pool: UOp, k: UOp, v: UOp, slot_mapping: UOp) -> UOp:
  (num_blocks, width, block_size), i, j = k_pool.shape, UOp.range(k.shape[0], 0), UOp.range(k.shape[1], 1)
  slot, vf = slot_mapping[i].cast(dtypes.weakint), v_pool.reshape((num_blocks * block_size, width))
  st = UOp.group(k_pool.index(slot // block_size, j, slot % block_size).store(k[i, j].load()), vf.index(slot, j).store(v[i, j].load()))
  return st.end(i, j).sink(arg=KernelInfo(name="kv_write", opts_to_apply=()))

@functools.cache
def wide_vectors() -> bool:
  """CPU with CC=clang-N, N >= 19, or TINYVLLM_WIDE=1: 8-wide register blocks, float4 grouping off (README: How it works)."""
  renderer, cc = Device[Device.DEFAULT].renderer, re.fullmatch(r"clang-(\d+)", getenv("CC", "clang"))
  if wide := type(renderer).__name__ == "ClangRenderer" and os.environ.get("TINYVLLM_WIDE", str(int(cc is not None and int(cc.group(1)) >= 19))) != "0":
    renderer.supports_float4 = False
  return wide

def _upcast(ranges: dict[str, int], *amounts: tuple[str, int]) -> tuple[Opt, ...]:  # by range name: opts number only ranges > 1
  names = [name for name, size in ranges.items() if size > 1]
  opts = tuple(Opt(OptOps.UPCAST, names.index(name), amount) for name, amount in amounts if amount > 1 and name in names)
  # the first range is split over the CPU's threads (the runner runs the parts in parallel)
  first, threads = next(iter(ranges)), NUM_CPU_THREADS.value if Device[Device.DEFAULT].renderer.has_threads else 1
  splits = threads > 1 and names[:1] == [first] and ranges[first] // dict(amounts).get(first, 1) % threads == 0
  return opts + ((Opt(OptOps.THREAD, 0, threads),) if splits else ())

def _paged_qk(out: UOp, q: UOp, k_pool: UOp, block_tables: UOp) -> UOp:
  """K blocks are stored transposed, [blocks, kv_heads * head_dim, block_size]: one register block is 16 tokens x a head group."""
  (num_tokens, num_heads, width), (_, kv_width, block_size), head_dim = out.shape, k_pool.shape, q.shape[2]
  n, h, b, p = UOp.range(num_tokens, 0), UOp.range(num_heads, 1), UOp.range(width // block_size, 2), UOp.range(block_size, 3)
  d, group = UOp.range(head_dim, 4, AxisType.REDUCE), num_heads * head_dim // kv_width
  # block ids clamped to the pool: with that bound tinygrad drops the %-wrap it puts on every load through a loaded index (3x)
  k = k_pool[block_tables[n, b].cast(dtypes.weakint).maximum(0).minimum(k_pool.shape[0] - 1), h // group * head_dim + d, p].load().cast(dtypes.float32)
  acc = (q[n, h, d].load().cast(dtypes.float32) * k).reduce(d, arg=Ops.ADD) * (head_dim ** -0.5)
  opts = _upcast({"n": num_tokens, "h": num_heads, "b": width // block_size, "p": block_size}, ("p", 16 if block_size % 16 == 0 else 1), ("h", group if group <= 3 else 1))
  return out.index(n, h, b * block_size + p).store(acc).end(n, h, b, p).sink(arg=KernelInfo(name="paged_qk", opts_to_apply=opts))

def _masked_exp(out: UOp, scores: UOp, context_lens: UOp) -> UOp:
  """exp(score - row max) over each row's first context_len scores, 0 past them: a softmax divided after PV (one exp)."""
  (num_tokens, num_heads, width), log2e = scores.shape, 1.4426950408889634
  n, h, t, t1 = UOp.range(num_tokens, 0), UOp.range(num_heads, 1), UOp.range(width, 2), UOp.range(width, 3, AxisType.REDUCE)
  ctx = context_lens[n].load()  # scores past a row's context (other sequences' padding, the causal future) are dropped
  row_max = (t1 < ctx).where(scores[n, h, t1].load(), -float("inf")).reduce(t1, arg=Ops.MAX)
  exp = (t < ctx).where(((scores[n, h, t].load() - row_max) * log2e).exp2(), 0.0)
  opts = _upcast({"n": num_tokens, "h": num_heads, "t": width})
  return out.index(n, h, t).store(exp).end(n, h, t).sink(arg=KernelInfo(name="masked_exp", opts_to_apply=opts))

def _paged_pv(out: UOp, p: UOp, v_pool: UOp, block_tables: UOp) -> UOp:
  (num_tokens, num_heads, head_dim), (_, block_size, num_kv_heads, _) = out.shape, v_pool.shape
  vf = v_pool.reshape((v_pool.shape[0] * block_size, num_kv_heads, head_dim))
  n, h, d = UOp.range(num_tokens, 0), UOp.range(num_heads, 1), UOp.range(head_dim, 2)
  t = UOp.range(p.shape[2], 3, AxisType.REDUCE)
  slot = block_tables[n, t // block_size].cast(dtypes.weakint).maximum(0).minimum(v_pool.shape[0] - 1) * block_size + t % block_size  # clamped: see _paged_qk
  acc = p[n, h, t].load() * vf[slot, h // (num_heads // num_kv_heads), d].load().cast(dtypes.float32)
  # 16 head dims (contiguous in the pool) x the heads sharing one KV head per register block: 4x faster than default here
  group = num_heads // num_kv_heads
  opts = _upcast({"n": num_tokens, "h": num_heads, "d": head_dim}, ("d", 16 if head_dim % 16 == 0 else 1), ("h", group if group <= 3 else 1))
  return out.index(n, h, d).store(acc.reduce(t, arg=Ops.ADD).cast(out.dtype)).end(n, h, d).sink(arg=KernelInfo(name="paged_pv", opts_to_apply=opts))

# On CPU, tinygrad's default matmul keeps one scalar accumulator per output and runs at ~5 GFLOPS here. Weights are
# stored as panels [N/8, K, 8] instead: the kernel streams one contiguous panel at a time and keeps an 8-column x
# 4-row block of accumulators in registers (~30-40 GFLOPS, 4-5x; B=1 reaches memory speed). Other devices keep
# [N, K] and tinygrad's own matmul heuristics.
PANEL, QBLOCK = 8, 32
DEQUANTIZE_ROWS = 128  # measured: at 128 rows dequantizing first is faster (4-bit prefill 1.3x), at 64 slower

def to_panels(w: Tensor) -> Tensor: return w.reshape(w.shape[0] // PANEL, PANEL, w.shape[1]).permute(0, 2, 1).contiguous()

def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
  """int8 codes and float32 scales [N, K/32]: one symmetric scale per 32 weights along K (Q8_0's scheme)."""
  blocks = w.reshape(w.shape[0], -1, QBLOCK)
  scale = blocks.abs().max(-1) / 127
  return (blocks / scale.maximum(1e-30).unsqueeze(-1)).round().cast(dtypes.int8).reshape(w.shape), scale

def _code(w: UOp, t: UOp, k: UOp, j: UOp) -> UOp:  # float, int8, or 4-bit: two codes per uint8 along K, k even in the low nibble
  return ((w[t, k // 2, j].load() >> (k % 2 * 4).cast(dtypes.uint8)) & 15 if w.dtype == dtypes.uint8 else w[t, k, j].load()).cast(dtypes.float32)

def _weight(w: UOp, scale: tuple[UOp, ...], t: UOp, k: UOp, j: UOp) -> UOp:  # code * scale (+ offset) of panel t, column j
  value = _code(w, t, k, j) * (scale[0][t, k // QBLOCK, j].load() if scale else 1.0)
  return value + scale[1][t, k // QBLOCK, j].load() if len(scale) > 1 else value

def _panel_matmul(out: UOp, x: UOp, w: UOp, *scale: UOp) -> UOp:
  (num_panels, _, P), (M, K) = w.shape, x.shape
  inner = QBLOCK if scale else K  # quantized: scale * sum(x * code) + offset * sum(x) per 32 along K, dequantizing outside the inner loop
  t, m, j, ki = UOp.range(num_panels, 0), UOp.range(M, 1), UOp.range(P, 2), UOp.range(inner, 4, AxisType.REDUCE)
  kb = UOp.range(K // QBLOCK, 3, AxisType.REDUCE) if scale else 0
  xk = x[m, kb * inner + ki].load().cast(dtypes.float32)
  acc = (xk * _code(w, t, kb * inner + ki, j)).reduce(ki, arg=Ops.ADD)
  if scale: acc = (acc * scale[0][t, kb, j].load() + (xk.reduce(ki, arg=Ops.ADD) * scale[1][t, kb, j].load() if len(scale) > 1 else 0.0)).reduce(kb, arg=Ops.ADD)
  # register block: rows x panels x 8 columns, 4 float4 or 8 ymm accumulators (one FMA chain each); 4-bit: both codes of a byte per step
  rows, most = (4 if M % 4 == 0 else 2 if M % 2 == 0 else 1), 8 if wide_vectors() else 4
  panels = max(d for d in (1, 2, 4) if num_panels % d == 0 and d * rows <= most)
  block = _upcast({"panel": num_panels, "row": M, "col": P}, ("col", P), ("row", rows), ("panel", panels))
  block += (Opt(OptOps.UNROLL, int(K > inner), 2),) if w.dtype == dtypes.uint8 else ()
  return out.index(m, t * P + j).store(acc.cast(out.dtype)).end(t, m, j).sink(arg=KernelInfo(name=f"linear_{M}_{num_panels * P}_{K}", opts_to_apply=block))

def _dequantize(out: UOp, w: UOp, *scale: UOp) -> UOp:
  t, k, j = (UOp.range(n, i) for i, n in enumerate(out.shape))
  return out.index(t, k, j).store(_weight(w, scale, t, k, j)).end(t, k, j).sink(arg=KernelInfo(name="dequantize", opts_to_apply=_upcast({"t": out.shape[0]})))

def linear(x: Tensor, w: Tensor, *scale: Tensor) -> Tensor:
  if w.ndim == 2: return x @ w.T
  if scale and x.shape[0] >= DEQUANTIZE_ROWS:  # many rows (prefill): dequantize once per call, then the float32 kernel
    w, scale = Tensor.empty(w.shape[0], x.shape[1], w.shape[2], device=w.device).custom_kernel(w, *scale, fxn=_dequantize)[0], ()
  out = Tensor.empty(x.shape[0], w.shape[0] * w.shape[2], dtype=x.dtype, device=x.device)
  return out.custom_kernel(x.contiguous(), w, *scale, fxn=_panel_matmul)[0]

def _gather_rows(out: UOp, table: UOp, index: UOp, *scale: UOp) -> UOp:
  i, j = UOp.range(out.shape[0], 0), UOp.range(out.shape[1], 1)
  row = index[i].cast(dtypes.weakint)
  value = table[row, j].load() if len(table.shape) == 2 else _weight(table, scale, row // table.shape[2], j, row % table.shape[2])
  return out.index(i, j).store(value.cast(out.dtype)).end(i, j).sink(arg=KernelInfo(name="gather_rows", opts_to_apply=()))

def gather_rows(table: Tensor, index: Tensor, *scale: Tensor, dtype: DType | None = None) -> Tensor:
  """Rows of a [rows, D] table, or of a [rows/8, D, 8] panel table (quantized ones with their scales), picked by index."""
  out = Tensor.empty(index.shape[0], table.shape[1] * (2 if table.dtype == dtypes.uint8 else 1), dtype=dtype or table.dtype, device=table.device)
  return out.custom_kernel(table, index, *scale, fxn=_gather_rows)[0]

def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
  xf = x.float()
  return ((xf * (xf.square().mean(-1, keepdim=True) + eps).rsqrt()).cast(x.dtype) * weight).contiguous()  # not re-done per matmul output

def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
  x1, x2 = x.chunk(2, dim=-1)
  return (x1 * cos - x2 * sin).cat(x2 * cos + x1 * sin, dim=-1)

MATMUL_WEIGHTS = ("qkv", "o", "gate_up", "down", "lm_head", "embed")  # stored as panels on CPU (gather_rows reads them too)

def _matrix(w: dict[str, Tensor], name: str, *args: Tensor) -> list[Tensor]:  # a weight, its args, then its scales and offsets if quantized
  return [w[name], *args, *(w[n] for n in (name + "_scale", name + "_min") if n in w)]

class Model:
  """Llama / Qwen2 / Qwen3 decoder over a flat batch of tokens with a paged KV cache.
  Every token row carries its own block table row and context length, so prefill chunks and decode
  tokens of many sequences run in one forward pass. The runner jits embed, one layer (reused for
  every layer with that layer's weights and pools as inputs) and head separately."""
  def __init__(self, config: ModelConfig, weights: dict[str, Tensor], num_blocks: int, block_size: int, dtype: DType, quantize: str | None = None):
    self.config, self.weights, self.dtype, c = config, weights, dtype, config
    if weights["lm_head"].device.startswith("CPU") or quantize:
      tied = weights["lm_head"] is weights["embed"]
      for name, w in list(weights.items()):
        if name.split(".")[-1] not in MATMUL_WEIGHTS or w.shape[0] % PANEL or (tied and name == "embed"): continue
        if quantize == "int8" and w.shape[1] % QBLOCK == 0: weights[name], weights[name + "_scale"] = quantize_int8(w)
        weights |= {n: to_panels(weights[n]).realize() for n in (name, name + "_scale", name + "_min") if n in weights}
      if tied: weights |= {k.replace("lm_head", "embed"): v for k, v in weights.items() if k.startswith("lm_head")}  # embed reads the panels
    self.inv_freq = Tensor(1.0 / (c.rope_theta ** (np.arange(0, c.head_dim, 2, dtype=np.float64) / c.head_dim)), dtype=dtypes.float32).realize()
    def pool(*shape: int) -> Tensor: return Tensor.zeros(num_blocks, *shape, dtype=dtype).contiguous().realize()
    kv_width = c.num_kv_heads * c.head_dim  # what the layer jit gets for layer i; K is transposed per block (paged_qk)
    self.layer_inputs = [{"k_pool": pool(kv_width, block_size), "v_pool": pool(block_size, c.num_kv_heads, c.head_dim)} for _ in range(c.num_layers)]
    for name, w in weights.items():
      if name.startswith("layers."):
        _, i, key = name.split(".")
        self.layer_inputs[int(i)][key] = w

  def embed(self, token_ids: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """-> the token rows and the RoPE cos/sin tables of their positions (computed once per step, read by every layer)."""
    freqs = positions.float().reshape(-1, 1, 1) * self.inv_freq.reshape(1, 1, -1)
    return gather_rows(*_matrix(self.weights, "embed", token_ids), dtype=self.dtype), freqs.cos(), freqs.sin()

  def layer(self, x: Tensor, cos: Tensor, sin: Tensor, block_tables: Tensor, context_lens: Tensor, slot_mapping: Tensor,
            k_pool: Tensor, v_pool: Tensor, **w: Tensor) -> Tensor:
    c, N = self.config, x.shape[0]
    qkv = linear(rms_norm(x, w["attn_norm"], c.rms_norm_eps), *_matrix(w, "qkv"))
    if c.qkv_bias: qkv = qkv + w["qkv_bias"]
    q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    q = qkv[:, :q_size].reshape(N, c.num_heads, c.head_dim)
    k = qkv[:, q_size:q_size + kv_size].reshape(N, c.num_kv_heads, c.head_dim)
    if c.qk_norm: q, k = rms_norm(q, w["q_norm"], c.rms_norm_eps), rms_norm(k, w["k_norm"], c.rms_norm_eps)
    q, k = rope(q, cos, sin), rope(k, cos, sin).reshape(N, kv_size)
    k_pool, v_pool = k_pool.custom_kernel(v_pool, k.contiguous(), qkv[:, q_size + kv_size:].contiguous(), slot_mapping, fxn=_kv_write)[:2]
    width = block_tables.shape[1] * v_pool.shape[1]
    scores = Tensor.empty(N, c.num_heads, width, dtype=dtypes.float32).custom_kernel(q.contiguous(), k_pool, block_tables, fxn=_paged_qk)[0]
    probs = Tensor.empty(N, c.num_heads, width, dtype=dtypes.float32).custom_kernel(scores, context_lens, fxn=_masked_exp)[0]
    attn = Tensor.empty(N, c.num_heads, c.head_dim, dtype=dtypes.float32).custom_kernel(probs, v_pool, block_tables, fxn=_paged_pv)[0]
    attn = (attn / probs.sum(-1, keepdim=True)).cast(x.dtype)
    x = x + linear(attn.reshape(N, q_size), *_matrix(w, "o"))
    gate, up = linear(rms_norm(x, w["mlp_norm"], c.rms_norm_eps), *_matrix(w, "gate_up")).chunk(2, dim=-1)
    return x + linear((gate.silu() * up).contiguous(), *_matrix(w, "down"))

  def head(self, x: Tensor, logits_indices: Tensor) -> Tensor:
    """-> float32 logits [len(logits_indices), vocab] of the selected token rows."""
    x = rms_norm(gather_rows(x, logits_indices), self.weights["norm"], self.config.rms_norm_eps)
    return linear(x, *_matrix(self.weights, "lm_head")).float()
