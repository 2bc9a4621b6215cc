from __future__ import annotations
import time
from dataclasses import dataclass
import numpy as np
from tinygrad import Tensor, TinyJit, dtypes
from .model import Model
from .sampling import sample
from .sequence import Sequence

def next_power_of_2(n: int) -> int: return 1 << max(0, n - 1).bit_length()

INPUT_DTYPES = {"token_ids": dtypes.int32, "positions": dtypes.int32, "block_tables": dtypes.int32, "context_lens": dtypes.int32,
                "slot_mapping": dtypes.int32, "logits_indices": dtypes.int32, "temperature": dtypes.float32, "top_k": dtypes.int32,
                "top_p": dtypes.float32, "min_p": dtypes.float32, "seeds": dtypes.uint32}

@dataclass(frozen=True)
class BatchShape:
  num_tokens: int  # token rows (bucketed)
  num_seqs: int    # sampled rows (bucketed)
  num_blocks: int  # block-table width (bucketed): attention cost follows the real context lengths
  greedy: bool

class ModelRunner:
  """Builds the flat token batch, keeps persistent input buffers per batch shape bucket, and runs the
  model as jitted pieces: embed, one layer (two TinyJits alternate so a layer's input never aliases its
  output; every layer replays them with its own weights and KV pools), and head + sampler. Capturing
  one layer instead of the whole model keeps the cost of a new bucket small."""
  def __init__(self, model: Model, block_size: int, max_blocks_per_seq: int):
    self.model, self.block_size, self.max_blocks_per_seq = model, block_size, max_blocks_per_seq
    self.jits: dict[tuple, TinyJit] = {}
    self.inputs: dict[BatchShape, dict[str, Tensor]] = {}

  def _jit(self, key: tuple, fn) -> TinyJit:
    if key not in self.jits:
      self.jits[key] = TinyJit(fn)
      self.jits[key].cnt = 1  # capture on the first call: weights and pools are realized, so no warm-up run is needed
    return self.jits[key]

  @staticmethod
  def _replay(jit: TinyJit, *args: Tensor, **kwargs: Tensor):
    """TinyJit's own input checks rewrite every input's graph (~0.1 ms each, 17 per layer call); our inputs are
    plain realized buffers of the captured shapes, so replay the captured kernels on them directly."""
    if jit.captured is None: return jit(*args, **kwargs)
    return jit.captured([t.uop.base for t in (*args, *(kwargs[k] for k in sorted(kwargs)))], {})

  def _forward(self, shape: BatchShape, b: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    m, N, W = self.model, shape.num_tokens, shape.num_blocks
    x = self._replay(self._jit(("embed", N), lambda token_ids: m.embed(token_ids).realize()), b["token_ids"])
    meta = {k: b[k] for k in ("positions", "block_tables", "context_lens", "slot_mapping")}
    for i in range(m.config.num_layers):
      x = self._replay(self._jit(("layer", N, W, i % 2), lambda x, **kw: m.layer(x, **kw).realize()), x, **meta, **m.layer_inputs(i))
    def head(x, logits_indices, temperature, top_k, top_p, min_p, seeds):
      logits = m.head(x, logits_indices).contiguous()  # else argmax/sampling fuse and recompute the lm_head matmul
      next_ids = logits.argmax(-1) if shape.greedy else sample(logits, temperature, top_k, top_p, min_p, seeds)
      return next_ids.cast(dtypes.int32).realize(), logits.realize()
    sampling = {k: b[k] for k in ("logits_indices", "temperature", "top_k", "top_p", "min_p", "seeds")}
    return self._replay(self._jit(("head", N, shape.num_seqs, shape.greedy), head), x, **sampling)

  def prepare(self, scheduled: list[tuple[Sequence, int]], seeds: list[int]) -> tuple[BatchShape, dict[str, np.ndarray], list[Sequence]]:
    """Flat arrays for the scheduled chunks; the sequences whose chunk reaches their end get a sampled token."""
    bs, rows, sampled = self.block_size, [], []
    for seq, n in scheduled:
      start = seq.num_computed_tokens
      rows.append((seq, start, n))
      if start + n == seq.num_tokens: sampled.append(seq)
    num_tokens = sum(n for _, _, n in rows)
    width = max(-(-(start + n) // bs) for _, start, n in rows)
    shape = BatchShape(next_power_of_2(num_tokens), next_power_of_2(max(len(sampled), 1)),
                       min(next_power_of_2(width), self.max_blocks_per_seq), all(s.sampling_params.temperature == 0 for s in sampled))
    a = {k: np.zeros(n, dtype=np.float32 if k in ("temperature", "top_p", "min_p") else np.int64)
         for k, n in (("token_ids", shape.num_tokens), ("positions", shape.num_tokens), ("slot_mapping", shape.num_tokens),
                      ("logits_indices", shape.num_seqs), ("temperature", shape.num_seqs), ("top_k", shape.num_seqs),
                      ("top_p", shape.num_seqs), ("min_p", shape.num_seqs), ("seeds", shape.num_seqs))}
    a["context_lens"] = np.ones(shape.num_tokens, dtype=np.int64)  # padded rows attend to one slot of block 0
    a["block_tables"] = np.zeros((shape.num_tokens, shape.num_blocks), dtype=np.int64)
    a["top_p"][:] = 1.0
    row = 0
    for seq, start, n in rows:
      pos = np.arange(start, start + n)
      table = np.asarray(seq.block_table, dtype=np.int64)
      a["token_ids"][row:row + n] = seq.token_ids[start:start + n]
      a["positions"][row:row + n] = pos
      a["slot_mapping"][row:row + n] = table[pos // bs] * bs + pos % bs
      a["context_lens"][row:row + n] = pos + 1
      a["block_tables"][row:row + n, :len(table)] = table[:shape.num_blocks]
      row += n
      if start + n == seq.num_tokens: a["logits_indices"][sampled.index(seq)] = row - 1
    for i, seq in enumerate(sampled):
      p = seq.sampling_params
      a["temperature"][i], a["top_k"][i], a["top_p"][i], a["min_p"][i], a["seeds"][i] = p.temperature, p.top_k, p.top_p, p.min_p, seeds[i]
    return shape, a, sampled

  def execute(self, scheduled: list[tuple[Sequence, int]], seeds: list[int]) -> tuple[list[Sequence], list[int]]:
    t0 = time.perf_counter()
    shape, arrays, sampled = self.prepare(scheduled, seeds)
    if shape not in self.inputs:
      self.inputs[shape] = {k: Tensor.zeros(*arrays[k].shape, dtype=dt).contiguous().realize() for k, dt in INPUT_DTYPES.items()}
    bufs = self.inputs[shape]
    for k, t in bufs.items():  # update the persistent input buffers in place
      buf = t.uop.buffer
      buf.allocator._copyin(buf._buf, memoryview(np.ascontiguousarray(arrays[k], dtype=_NP[k])).cast("B"))
    t1 = time.perf_counter()
    next_ids, self.last_logits = self._forward(shape, bufs)  # logits stay on the device; tests read them
    next_ids = next_ids.numpy()[:len(sampled)].tolist()
    self.last_timings = {"prepare_s": t1 - t0, "forward_s": time.perf_counter() - t1}  # forward: kernel launches + device time
    return sampled, next_ids

_NP = {k: np.uint32 if k == "seeds" else np.float32 if dt == dtypes.float32 else np.int32 for k, dt in INPUT_DTYPES.items()}
