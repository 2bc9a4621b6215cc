from __future__ import annotations
import ctypes, queue, threading, time
from dataclasses import dataclass
import numpy as np
from tinygrad import Tensor, TinyJit, dtypes
from tinygrad.engine.realize import get_call_arg_uops, get_runtime
from tinygrad.helpers import BEAM, DEBUG, PARALLEL, Context
from tinygrad.uop.ops import Ops, UOp
from .model import Model, wide_vectors
from .sampling import sample
from .sequence import Sequence

def next_power_of_2(n: int) -> int: return 1 << max(0, n - 1).bit_length()
def block_table_width(context_len: int, block_size: int) -> int:
  """The block-table width a batch reaching context_len is padded to (a new width is a new TinyJit capture)."""
  return next_power_of_2(-(-context_len // block_size))

@dataclass(frozen=True)
class BatchShape:
  num_tokens: int  # token rows (bucketed)
  num_seqs: int    # sampled rows (bucketed)
  num_blocks: int  # block-table width (bucketed): attention cost follows the real context lengths
  greedy: bool
  filtered: bool  # a sampling row uses top-k or top-p

class ModelRunner:
  """Builds the flat token batch into persistent input buffers per batch shape bucket and runs the model as jitted
  pieces: embed, one layer (two TinyJits alternate so a layer's input never aliases its output; every layer replays
  them with its own weights and KV pools: a new bucket captures one layer, not the model), and head + sampler."""
  def __init__(self, model: Model, block_size: int, max_blocks_per_seq: int, beam: int = 0):
    self.model, self.block_size, self.max_blocks_per_seq, self.beam = model, block_size, max_blocks_per_seq, beam
    self.jits: dict[tuple, TinyJit] = {}
    self.inputs: dict[BatchShape, dict[str, Tensor]] = {}
    self.direct: dict[TinyJit, CPUReplay] = {}
    self.workers: list[Worker] = []  # threads that run the other parts of kernels split over the CPU's cores

  def _jit(self, key: tuple, fn) -> TinyJit:
    if key not in self.jits:
      self.jits[key] = TinyJit(fn)
      self.jits[key].cnt = 1  # capture on the first call: weights and pools are realized, so no warm-up run is needed
    return self.jits[key]

  def _replay(self, jit: TinyJit, *args: Tensor, **kwargs: Tensor):
    """TinyJit's own input checks rewrite every input's graph (~0.1 ms each, 17 per layer call); our inputs are
    plain realized buffers of the captured shapes, so replay the captured kernels on them directly."""
    if jit.captured is None:
      with Context(BEAM=self.beam or BEAM.value, PARALLEL=0 if wide_vectors() else PARALLEL.value): out = jit(*args, **kwargs)  # capture; beam > 0 searches the kernels' opts
      try: self.direct[jit] = CPUReplay(jit, self.workers)
      except (NotImplementedError, AttributeError): pass  # other devices: tinygrad's replay
      return out
    inputs = [t.uop.base for t in (*args, *(kwargs[k] for k in sorted(kwargs)))]
    direct = self.direct.get(jit) if DEBUG.value < 2 else None  # DEBUG=2 (per-kernel timing: bench profile) needs tinygrad's replay
    return direct(inputs) if direct else jit.captured(inputs, {})

  def _forward(self, shape: BatchShape, b: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    m, N, W = self.model, shape.num_tokens, shape.num_blocks
    embed = self._jit(("embed", N), lambda token_ids, positions: tuple(t.realize() for t in m.embed(token_ids, positions)))
    x, cos, sin = self._replay(embed, b["token_ids"], b["positions"])
    meta = {"cos": cos, "sin": sin} | {k: b[k] for k in ("block_tables", "context_lens", "slot_mapping")}
    for i in range(m.config.num_layers):
      x = self._replay(self._jit(("layer", N, W, i % 2), lambda x, **kw: m.layer(x, **kw).realize()), x, **meta, **m.layer_inputs[i])
    def head(x, logits_indices, temperature, top_k, top_p, min_p, seeds):
      logits = m.head(x, logits_indices).contiguous()  # else argmax/sampling fuse and recompute the lm_head matmul
      next_ids = logits.argmax(-1) if shape.greedy else sample(logits, temperature, top_k, top_p, min_p, seeds, shape.filtered)
      return next_ids.cast(dtypes.int32).realize(), logits.realize()
    sampling = {k: b[k] for k in ("logits_indices", "temperature", "top_k", "top_p", "min_p", "seeds")}
    return self._replay(self._jit(("head", N, shape.num_seqs, shape.greedy, shape.filtered), head), x, **sampling)

  def prepare(self, scheduled: list[tuple[Sequence, int]]) -> tuple[BatchShape, dict[str, np.ndarray], list[Sequence]]:
    """Flat arrays for the scheduled chunks; the sequences whose chunk reaches their end get a sampled token."""
    bs, rows = self.block_size, [(seq, seq.num_computed_tokens, n) for seq, n in scheduled]
    sampled = [seq for seq, start, n in rows if start + n == seq.num_tokens]
    width = max(-(-(start + n) // bs) for _, start, n in rows)
    shape = BatchShape(next_power_of_2(sum(n for _, n in scheduled)), next_power_of_2(max(len(sampled), 1)),
                       min(next_power_of_2(width), self.max_blocks_per_seq), all(s.sampling_params.temperature == 0 for s in sampled),
                       any(p.temperature > 0 and (p.top_k > 0 or p.top_p < 1) for p in (s.sampling_params for s in sampled)))
    T, S = shape.num_tokens, shape.num_seqs
    a = {"token_ids": np.zeros(T, np.int32), "positions": np.zeros(T, np.int32), "slot_mapping": np.zeros(T, np.int32),
         "block_tables": np.zeros((T, shape.num_blocks), np.int32), "context_lens": np.ones(T, np.int32),  # padded rows attend to one slot of block 0
         "logits_indices": np.zeros(S, np.int32), "temperature": np.zeros(S, np.float32), "top_k": np.zeros(S, np.int32),
         "top_p": np.ones(S, np.float32), "min_p": np.zeros(S, np.float32), "seeds": np.zeros(S, np.uint32)}
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
    for k in ("temperature", "top_k", "top_p", "min_p"): a[k][:len(sampled)] = [getattr(s.sampling_params, k) for s in sampled]
    # a fresh seed per generated token, fixed by the request's seed: reproducible whatever the batch
    a["seeds"][:len(sampled)] = [hash((s.sampling_params.seed, len(s.output_token_ids))) & 0xFFFFFFFF for s in sampled]
    return shape, a, sampled

  def execute(self, scheduled: list[tuple[Sequence, int]]) -> tuple[list[Sequence], list[int]]:
    t0 = time.perf_counter()
    shape, arrays, sampled = self.prepare(scheduled)
    if shape not in self.inputs:
      self.inputs[shape] = {k: Tensor.zeros(*a.shape, dtype=a.dtype.name).contiguous().realize() for k, a in arrays.items()}
    for k, t in self.inputs[shape].items():  # update the persistent input buffers in place
      buf = t.uop.buffer
      buf.allocator._copyin(buf._buf, memoryview(arrays[k]).cast("B"))
    t1 = time.perf_counter()
    next_ids, self.last_logits = self._forward(shape, self.inputs[shape])  # logits stay on the device; tests read them
    next_ids = next_ids.numpy()[:len(sampled)].tolist()
    self.last_timings = {"prepare_s": t1 - t0, "forward_s": time.perf_counter() - t1}  # forward: kernel launches + device time
    return sampled, next_ids

class CPUReplay:
  """Calls a captured TinyJit's compiled CPU kernels directly (tinygrad's replay costs ~40 us of Python per kernel, ~600
  per decode step). Only the JIT's inputs (PARAM slots) change between calls; other arguments are fixed addresses."""
  def __init__(self, jit: TinyJit, workers: list[Worker]):
    self.ret, self.kernels, self.workers = jit.captured.ret, [], workers
    for call in jit.captured.linear.src:
      prg, args = call.src[0], get_call_arg_uops(call)
      if prg.op is not Ops.PROGRAM or not call.src[1].device.startswith("CPU") or any(a.op in (Ops.MSELECT, Ops.SHRINK, Ops.MSTACK) for a in args):
        raise NotImplementedError("only plain CPU kernels replay directly")
      rt = get_runtime(call.src[1].device, prg)
      argv = [0 if (a := args[i]).op is Ops.PARAM else a.buffer.ensure_allocated().get_buf(a.device).va_addr for i in prg.arg.globals]
      argv += [v or 0 for v in prg.arg.vals({})]
      params = [(pos, args[i].arg.slot) for pos, i in enumerate(prg.arg.globals) if args[i].op is Ops.PARAM]
      fxn = ctypes.CFUNCTYPE(None, *[ctypes.c_uint64] * len(argv))(rt.addr)  # rt stays referenced: it owns the code
      core_id = rt.runtimevars.get("core_id")
      self.kernels.append((fxn, rt, argv, params, core_id, num_threads := 1 if core_id is None else prg.arg.launch_dims({})[0][0]))
      workers.extend(Worker() for _ in range(num_threads - 1 - len(workers)))

  def __call__(self, inputs: list[UOp]):
    addrs = [u.buffer._buf.va_addr for u in inputs]
    for fxn, _, argv, params, core_id, num_threads in self.kernels:
      for pos, slot in params: argv[pos] = addrs[slot]
      if core_id is None: fxn(*argv)
      else:  # a kernel split over threads takes its thread index as an argument: part 0 here, the others on workers
        for tid in range(1, num_threads): self.workers[tid - 1].jobs.put((fxn, [*argv[:core_id], tid, *argv[core_id + 1:]]))
        argv[core_id] = 0
        fxn(*argv)
        for tid in range(1, num_threads): self.workers[tid - 1].done.acquire()
    return self.ret

class Worker:
  """Runs one part of kernels split over threads; ctypes calls release the GIL, so the parts run on different cores."""
  def __init__(self):
    self.jobs, self.done = queue.SimpleQueue(), threading.Semaphore(0)
    threading.Thread(target=self._run, daemon=True).start()
  def _run(self):
    while True:
      fxn, argv = self.jobs.get()
      fxn(*argv)
      self.done.release()
