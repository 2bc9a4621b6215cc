"""Paged KV write and paged attention as small UOp kernels: they read through the block table instead of
materialising a gather, and write only the new slots (a tensor-index setitem rewrites the whole pool)."""

from tinygrad import Tensor, dtypes
from tinygrad.codegen.opt import OptOps
from tinygrad.uop.ops import AxisType, KernelInfo, Ops, UOp

from .opts import divisor, has_local, heuristic_on_gpu, upcast, workgroups


def _kv_write(k_pool: UOp, v_pool: UOp, k: UOp, v: UOp, slot_mapping: UOp) -> UOp:
  num_blocks, width, block_size = k_pool.shape
  i, j = UOp.range(k.shape[0], 0), UOp.range(k.shape[1], 1)
  slot = slot_mapping[i].cast(dtypes.weakint)
  v_slots = v_pool.reshape((num_blocks * block_size, width))
  k_store = k_pool.index(slot // block_size, j, slot % block_size).store(k[i, j].load())
  v_store = v_slots.index(slot, j).store(v[i, j].load())
  opts = heuristic_on_gpu(())
  return UOp.group(k_store, v_store).end(i, j).sink(arg=KernelInfo(name="kv_write", opts_to_apply=opts))


def _clamped(block_id: UOp, num_blocks: int) -> UOp:
  """Block ids clamped to the pool: with that bound tinygrad drops the %-wrap it puts on every load through a loaded
  index (3x faster attention)."""
  return block_id.cast(dtypes.weakint).maximum(0).minimum(num_blocks - 1)


def _paged_qk(out: UOp, q: UOp, k_pool: UOp, block_tables: UOp) -> UOp:
  """K blocks are stored transposed, [blocks, kv_heads * head_dim, block_size]: one register block is 16 tokens x a
  head group."""
  (num_tokens, num_heads, width), (num_blocks, kv_width, block_size), head_dim = out.shape, k_pool.shape, q.shape[2]
  n, h = UOp.range(num_tokens, 0), UOp.range(num_heads, 1)
  b, p = UOp.range(width // block_size, 2), UOp.range(block_size, 3)
  d = UOp.range(head_dim, 4, AxisType.REDUCE)
  group = num_heads * head_dim // kv_width
  k = k_pool[_clamped(block_tables[n, b], num_blocks), h // group * head_dim + d, p].load().cast(dtypes.float32)
  q_d = q[n, h, d].load().cast(dtypes.float32)
  score = (q_d * k).reduce(d, arg=Ops.ADD) * (head_dim**-0.5)
  ranges = {"n": num_tokens, "h": num_heads, "b": width // block_size, "p": block_size}
  if has_local():  # a workgroup: 16 tokens (contiguous in K) x up to 4 blocks, for the heads of one KV head
    steps = (OptOps.UPCAST, "h", group if group <= 3 else 1), (OptOps.LOCAL, "p", divisor(block_size, 16, 8, 4, 2))
    steps += (OptOps.UNROLL, "d", 4), (OptOps.LOCAL, "b", divisor(width // block_size, 4, 2))
    opts = workgroups(ranges, {"d": head_dim}, *steps)
  else:
    opts = upcast(ranges, ("p", 16 if block_size % 16 == 0 else 1), ("h", group if group <= 3 else 1))
  store = out.index(n, h, b * block_size + p).store(score).end(n, h, b, p)
  return store.sink(arg=KernelInfo(name="paged_qk", opts_to_apply=opts))


def _masked_exp(out: UOp, scores: UOp, context_lens: UOp, window: UOp) -> UOp:
  """exp(score - row max) over each row's last `window` of its first context_len scores, 0 elsewhere: a softmax
  divided after PV (one exp per score)."""
  (num_tokens, num_heads, width), log2e = scores.shape, 1.4426950408889634
  n, h, t = UOp.range(num_tokens, 0), UOp.range(num_heads, 1), UOp.range(width, 2)
  t1 = UOp.range(width, 3, AxisType.REDUCE)
  ctx = context_lens[n].load()  # scores past a row's context (other sequences' padding, the causal future) are dropped
  start = ctx - window[0].load()  # sliding window: the oldest position still attended to (negative: none dropped)
  row_max = ((t1 < ctx) & (t1 >= start)).where(scores[n, h, t1].load(), -float("inf")).reduce(t1, arg=Ops.MAX)
  exp = ((t < ctx) & (t >= start)).where(((scores[n, h, t].load() - row_max) * log2e).exp2(), 0.0)
  opts = heuristic_on_gpu(upcast({"n": num_tokens, "h": num_heads, "t": width}))
  return out.index(n, h, t).store(exp).end(n, h, t).sink(arg=KernelInfo(name="masked_exp", opts_to_apply=opts))


def _paged_pv(out: UOp, p: UOp, v_pool: UOp, block_tables: UOp) -> UOp:
  (num_tokens, num_heads, head_dim), (num_blocks, block_size, num_kv_heads, _) = out.shape, v_pool.shape
  v_slots = v_pool.reshape((num_blocks * block_size, num_kv_heads, head_dim))
  n, h, d = UOp.range(num_tokens, 0), UOp.range(num_heads, 1), UOp.range(head_dim, 2)
  group, ranges = num_heads // num_kv_heads, {"n": num_tokens, "h": num_heads, "d": head_dim}
  if has_local():  # block and position as ranges of their own (tinygrad would split t at its `%`), named in the opts
    blocks = p.shape[2] // block_size
    ts = UOp.range(blocks, 3, AxisType.REDUCE), UOp.range(block_size, 4, AxisType.REDUCE)
    t = ts[0] * block_size + ts[1]
    # a workgroup: 16 threads x 4 head dims (contiguous in V) for the heads of one KV head, the tokens over 8 threads
    steps = (OptOps.UPCAST, "h", group if group <= 3 else 1), (OptOps.UPCAST, "d", 4), (OptOps.LOCAL, "d", 16)
    steps += ((OptOps.GROUP, "pos", divisor(block_size, 8, 4, 2)),)
    opts = workgroups(ranges, {"block": blocks, "pos": block_size}, *steps)
  else:
    ts = (t := UOp.range(p.shape[2], 3, AxisType.REDUCE),)
    # 16 head dims (contiguous in the pool) x the heads sharing one KV head per register block: 4x faster than default
    opts = upcast(ranges, ("d", 16 if head_dim % 16 == 0 else 1), ("h", group if group <= 3 else 1))
  slot = _clamped(block_tables[n, t // block_size], num_blocks) * block_size + t % block_size
  weighted = p[n, h, t].load() * v_slots[slot, h // group, d].load().cast(dtypes.float32)
  store = out.index(n, h, d).store(weighted.reduce(*ts, arg=Ops.ADD).cast(out.dtype)).end(n, h, d)
  return store.sink(arg=KernelInfo(name="paged_pv", opts_to_apply=opts))


def write_kv(k_pool: Tensor, v_pool: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> tuple[Tensor, Tensor]:
  """Write each token row's K [tokens, kv_heads * head_dim] and V into its slot of the pools."""
  return k_pool.custom_kernel(v_pool, k.contiguous(), v.contiguous(), slot_mapping, fxn=_kv_write)[:2]


def paged_attention(
  q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, context_lens: Tensor, window: Tensor
) -> Tensor:
  """Causal attention of q [tokens, heads, head_dim] over the last `window` of each row's first context_len cached
  tokens -> float32."""
  num_tokens, num_heads, head_dim = q.shape
  width = block_tables.shape[1] * v_pool.shape[1]
  scores = Tensor.empty(num_tokens, num_heads, width, dtype=dtypes.float32)
  scores = scores.custom_kernel(q.contiguous(), k_pool, block_tables, fxn=_paged_qk)[0]
  probs = Tensor.empty(num_tokens, num_heads, width, dtype=dtypes.float32)
  probs = probs.custom_kernel(scores, context_lens, window, fxn=_masked_exp)[0]
  attn = Tensor.empty(num_tokens, num_heads, head_dim, dtype=dtypes.float32)
  attn = attn.custom_kernel(probs, v_pool, block_tables, fxn=_paged_pv)[0]
  return attn / probs.sum(-1, keepdim=True)
