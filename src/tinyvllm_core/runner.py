from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace

import numpy as np
from tinygrad import Device, Tensor, TinyJit, dtypes
from tinygrad.helpers import BEAM, DEBUG, Context

from .config import on_cpu
from .model import Model
from .kernels.devices import read_back
from .kernels.penalties import PENALTY_INPUTS, apply_penalties, penalty_arrays, penalty_entries
from .kernels.sampler import apply_bitmask, grammar_bitmask, sample, top_logprobs
from .sampling import SamplingParams
from .sequence import Sequence


def next_power_of_2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def block_table_width(context_len: int, block_size: int) -> int:
  """The block-table width a batch reaching context_len is padded to (a new width is a new TinyJit capture)."""
  return next_power_of_2(-(-context_len // block_size))


@dataclass(frozen=True)
class BatchShape:
  num_tokens: int  # token rows (bucketed)
  num_seqs: int  # sampled rows (bucketed)
  num_blocks: int  # block-table width (bucketed): attention cost follows the real context lengths
  greedy: bool
  filtered: bool  # a sampling row uses top-k or top-p
  penalty_width: int = 0  # distinct tokens per row the penalties touch (bucketed); 0: no row uses penalties
  masked: bool = False  # a row's output follows a grammar (a bitmask input of allowed tokens)
  logprobs: bool = False  # a row asks for logprobs
  speculative: bool = False  # a sampling (not greedy) row verifies a draft token (a draft_ids input)


@dataclass
class Chunk:
  """The tokens [start, start + num_tokens) of a sequence, computed this step."""

  seq: Sequence
  start: int
  num_tokens: int

  @property
  def end(self) -> int:
    return self.start + self.num_tokens

  @property
  def num_sampled_rows(self) -> int:  # rows that yield a token: the last real token's and each draft's
    last_real = self.seq.num_tokens - len(self.seq.spec_token_ids) - 1
    return max(0, self.end - max(self.start, last_real))


def _is_filtered(params: SamplingParams) -> bool:
  return params.temperature > 0 and (params.top_k > 0 or params.top_p < 1)


SAMPLING_INPUTS = ("logits_indices", "temperature", "top_k", "top_p", "min_p", "seeds")
STEP_INPUTS = ("block_tables", "context_lens", "slot_mapping")  # every layer reads them


class ModelRunner:
  """Builds the flat token batch into persistent input buffers per batch shape bucket and runs the model as jitted
  pieces: embed, one layer (two TinyJits alternate so a layer's input never aliases its output; every layer replays
  them with its own weights and KV pools: a new bucket captures one layer, not the model), and head + sampler."""

  def __init__(self, model: Model, device: str, block_size: int, max_blocks_per_seq: int, beam: int = 0):
    self.model, self.block_size, self.max_blocks_per_seq, self.beam = model, block_size, max_blocks_per_seq, beam
    self.cpu = on_cpu(device)  # kernels/cpu.py: direct replay, worker threads
    self.cl = device.split(":")[0] == "CL"  # kernels/cl.py: direct replay, arguments set once per capture
    # devices with graphs (CUDA, NV, AMD, METAL) launch a jit's kernels as one graph, and CL's direct replay sets a
    # kernel's arguments once: capture the whole forward once per shape; on CPU one layer's jit, replayed per layer,
    # keeps capture short (a new shape captures one layer)
    self.whole_forward = Device[device].graph is not None or self.cl
    self.jits: dict[tuple, TinyJit] = {}
    self.inputs: dict[BatchShape, dict[str, Tensor]] = {}
    self.direct: dict[TinyJit, object] = {}  # jit -> kernels.cpu.CPUReplay or kernels.cl.CLReplay
    self.plans: dict[BatchShape, object] = {}  # CPU: a step's direct replays as one kernels.cpu.StepPlan
    # a layer jit per weight layout: a Q4_K_M file mixes block types between layers (Q4_K / Q6_K, Q5_0 / Q8_0 rows)
    layouts = [tuple((k, t.shape, t.dtype) for k, t in sorted(w.items())) for w in model.layer_inputs]
    self.layer_layout = [layouts.index(layout) for layout in layouts]

  def _jit(self, key: tuple, fn) -> TinyJit:
    if key not in self.jits:
      self.jits[key] = TinyJit(fn)
      self.jits[key].cnt = 1  # capture on the first call: weights and pools are realized, so no warm-up run is needed
    return self.jits[key]

  def _capture(self, jit: TinyJit, *args: Tensor, **kwargs: Tensor):
    settings = {"BEAM": self.beam or BEAM.value}  # beam > 0 searches the kernels' opts
    if self.cpu:
      from .kernels import cpu

      settings |= cpu.capture_settings()
    with Context(**settings):
      out = jit(*args, **kwargs)
    with contextlib.suppress(NotImplementedError, AttributeError):  # kernels it cannot call: tinygrad's replay
      if self.cpu:
        self.direct[jit] = cpu.CPUReplay(jit)
      elif self.cl:
        from .kernels.cl import CLReplay

        self.direct[jit] = CLReplay(jit)
    return out

  def _replay(self, jit: TinyJit, *args: Tensor, **kwargs: Tensor):
    """TinyJit's own input checks rewrite every input's graph (~0.1 ms each, 17 per layer call); our inputs are
    plain realized buffers of the captured shapes, so replay the captured kernels on them directly."""
    if jit.captured is None:
      self.calls.append((None, []))  # captured the tinygrad way this step: no plan from it
      return self._capture(jit, *args, **kwargs)
    inputs = [t.uop.base for t in (*args, *(kwargs[k] for k in sorted(kwargs)))]
    direct = self.direct.get(jit) if DEBUG.value < 2 else None  # DEBUG=2 (per-kernel timing) needs tinygrad's replay
    self.calls.append((direct, inputs))
    return direct(inputs) if direct else jit.captured(inputs, {})

  def _forward(self, shape: BatchShape, b: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    m, N, W = self.model, shape.num_tokens, shape.num_blocks

    def embed(token_ids: Tensor, positions: Tensor):
      return tuple(t.realize() for t in m.embed(token_ids, positions))

    def layer(x: Tensor, **inputs: Tensor):
      return m.layer(x, **inputs).realize()

    def head(x, logits_indices, temperature, top_k, top_p, min_p, seeds, bitmask=None, draft_ids=None, **penalties):
      logits = m.head(x, logits_indices).contiguous()  # else argmax/sampling fuse and recompute the lm_head matmul
      if penalties:
        logits = apply_penalties(logits, *(penalties[k] for k in PENALTY_INPUTS))
      if bitmask is not None:
        logits = apply_bitmask(logits, bitmask).contiguous()
      if shape.greedy:
        next_ids = logits.argmax(-1)
      else:
        next_ids = sample(logits, temperature, top_k, top_p, min_p, seeds, shape.filtered, draft_ids)
      next_ids = next_ids.cast(dtypes.int32)
      extra = top_logprobs(logits, temperature, next_ids) if shape.logprobs else ()
      return tuple(t.realize() for t in (next_ids, logits, *extra))

    def forward(token_ids: Tensor, positions: Tensor, **inputs: Tensor):
      x, cos, sin = embed(token_ids, positions)
      step_inputs = {"cos": cos, "sin": sin} | {k: inputs.pop(k) for k in STEP_INPUTS}
      for i in range(m.config.num_layers):
        x = layer(x, **step_inputs, **m.layer_inputs[i])
      return head(x, **inputs)

    self.calls: list[tuple] = []  # this step's direct replays, with their inputs
    if self.whole_forward:
      return self._replay(self._jit(("forward", shape), forward), **b)
    if (plan := self.plans.get(shape)) and DEBUG.value < 2:  # ~20 us of Python per layer call less
      return plan()
    x, cos, sin = self._replay(self._jit(("embed", N), embed), b["token_ids"], b["positions"])
    step_inputs = {"cos": cos, "sin": sin} | {k: b[k] for k in STEP_INPUTS}
    for i in range(m.config.num_layers):
      layer_jit = self._jit(("layer", N, W, i % 2, self.layer_layout[i]), layer)
      x = self._replay(layer_jit, x, **step_inputs, **m.layer_inputs[i])
    sampling = {k: b[k] for k in (*SAMPLING_INPUTS, *PENALTY_INPUTS, "bitmask", "draft_ids") if k in b}
    head_key = ("head", replace(shape, num_blocks=0))  # the head reads no block table: one jit for every width
    out = self._replay(self._jit(head_key, head), x, **sampling)
    if self.cpu and all(direct for direct, _ in self.calls):
      from .kernels.cpu import StepPlan  # every input is a persistent buffer of this shape: fixed addresses

      self.plans[shape] = StepPlan(self.calls, out)
    return out

  def _batch_shape(self, chunks: list[Chunk], sampled: list[Sequence], penalty_width: int) -> BatchShape:
    width = block_table_width(max(c.end for c in chunks), self.block_size)
    params = [s.sampling_params for s in sampled]
    greedy = all(p.temperature == 0 for p in params)
    return BatchShape(
      num_tokens=next_power_of_2(sum(c.num_tokens for c in chunks)),
      num_seqs=next_power_of_2(max(len(sampled), 1)),
      num_blocks=min(width, self.max_blocks_per_seq),
      greedy=greedy,
      filtered=any(map(_is_filtered, params)),
      penalty_width=penalty_width,
      masked=any(s.matcher for s in sampled),
      logprobs=any(p.logprobs is not None for p in params),
      speculative=not greedy and any(s.spec_token_ids for s in sampled),
    )

  def prepare(self, scheduled: list[tuple[Sequence, int]]) -> tuple[BatchShape, dict[str, np.ndarray], list[Sequence]]:
    """Flat arrays for the scheduled chunks; a chunk reaching its sequence's last token gets a sampled row, and one
    more per draft token it verifies."""
    chunks = [Chunk(seq, seq.num_computed_tokens, n) for seq, n in scheduled]
    sampled = [c.seq for c in chunks for _ in range(c.num_sampled_rows)]  # a sequence's rows are adjacent
    offsets = [j for c in chunks for j in range(c.num_sampled_rows)]  # tokens after the output: its seed
    penalized = {i: s for i, s in enumerate(sampled) if s.sampling_params.penalized}
    penalties = {
      i: penalty_entries(s.sampling_params, s.prompt_token_ids, s.output_token_ids) for i, s in penalized.items()
    }
    # at least 4: at width 1 tinygrad's OpenCL renderer drops the penalty kernel's num_tokens buffer (IndexError)
    penalty_width = max(4, next_power_of_2(max(len(entry[0]) for entry in penalties.values()))) if penalties else 0
    shape = self._batch_shape(chunks, sampled, penalty_width)
    T, S = shape.num_tokens, shape.num_seqs
    a = {
      **{k: np.zeros(T, np.int32) for k in ("token_ids", "positions", "slot_mapping")},
      "block_tables": np.zeros((T, shape.num_blocks), np.int32),
      "context_lens": np.ones(T, np.int32),  # padded rows attend to one slot of block 0
      "logits_indices": np.zeros(S, np.int32),
      "temperature": np.zeros(S, np.float32),
      "top_k": np.zeros(S, np.int32),
      "top_p": np.ones(S, np.float32),
      "min_p": np.zeros(S, np.float32),
      "seeds": np.zeros(S, np.uint32),
    }
    row = out = 0
    for c in chunks:
      self._fill_rows(a, row, c, shape.num_blocks)
      row, out = row + c.num_tokens, out + c.num_sampled_rows
      a["logits_indices"][out - c.num_sampled_rows : out] = np.arange(row - c.num_sampled_rows, row)
    for k in ("temperature", "top_k", "top_p", "min_p"):
      a[k][: len(sampled)] = [getattr(s.sampling_params, k) for s in sampled]
    # a fresh seed per generated token, fixed by the request's seed: reproducible whatever the batch
    seeds = [hash((s.sampling_params.seed, len(s.output_token_ids) + j)) for s, j in zip(sampled, offsets)]
    a["seeds"][: len(sampled)] = [h & 0xFFFFFFFF for h in seeds]
    if penalties:
      a |= penalty_arrays(penalties, [s.sampling_params for s in sampled], S, penalty_width)
    if shape.speculative:  # row j of a sequence verifies its draft j; its last row has none
      drafts = [d for c in chunks if c.num_sampled_rows for d in (*c.seq.spec_token_ids[: c.num_sampled_rows - 1], -1)]
      a["draft_ids"] = np.full(S, -1, np.int32)
      a["draft_ids"][: len(drafts)] = drafts
    if shape.masked:
      a["bitmask"] = grammar_bitmask(sampled, S, self.model.config.vocab_size)
    return shape, a, sampled

  def _fill_rows(self, a: dict[str, np.ndarray], row: int, chunk: Chunk, num_blocks: int) -> None:
    bs, rows = self.block_size, slice(row, row + chunk.num_tokens)
    pos = np.arange(chunk.start, chunk.end)
    table = np.asarray(chunk.seq.block_table, dtype=np.int64)
    a["token_ids"][rows] = chunk.seq.token_ids[chunk.start : chunk.end]
    a["positions"][rows] = pos
    a["slot_mapping"][rows] = table[pos // bs] * bs + pos % bs
    a["context_lens"][rows] = pos + 1
    a["block_tables"][rows, : len(table)] = table[:num_blocks]

  def execute(self, scheduled: list[tuple[Sequence, int]]) -> tuple[list[Sequence], list[int]]:
    t0 = time.perf_counter()
    shape, arrays, sampled = self.prepare(scheduled)
    if shape not in self.inputs:
      self.inputs[shape] = {
        k: Tensor.zeros(*a.shape, dtype=a.dtype.name).contiguous().realize() for k, a in arrays.items()
      }
    for k, t in self.inputs[shape].items():  # update the persistent input buffers in place
      buf = t.uop.buffer
      buf.allocator._copyin(buf._buf, memoryview(arrays[k]).cast("B"))
    t1 = time.perf_counter()
    next_ids, self.last_logits, *logprobs = self._forward(shape, self.inputs[shape])  # logits stay on the device
    t2 = time.perf_counter()  # the step's kernels are queued (on CPU: have run)
    next_ids = read_back(next_ids)[: len(sampled)].tolist()
    self.last_logprobs = [read_back(t) for t in logprobs]  # chosen [S], top values and token ids [S, k]
    self.last_timings = {"prepare_s": t1 - t0, "launch_s": t2 - t1, "forward_s": time.perf_counter() - t1}
    return sampled, next_ids
