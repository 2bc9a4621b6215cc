from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tinygrad import dtypes

from .block_manager import BlockManager
from .config import EngineConfig, num_kv_blocks, on_cpu, resolve_device, resolve_dtype
from .formats import ModelFiles, load_model_files, prepare_weights, render_chat, resolve_quantize
from .formats.tokenizer import Detokenizer
from .model import Model
from .runner import BatchShape, ModelRunner, block_table_width
from .sampling import SamplingParams
from .scheduler import Scheduler
from .sequence import Logprob, Sequence


def check_prompt(ids: list[int], max_model_len: int, vocab_size: int) -> None:
  """ValueError naming what is wrong with a prompt's token ids."""
  if not ids:
    raise ValueError("prompt is empty")
  if len(ids) >= max_model_len:
    raise ValueError(
      f"prompt has {len(ids)} tokens but the context is {max_model_len} tokens (max_model_len); shorten it"
    )
  if bad := [i for i in ids if not 0 <= i < vocab_size]:
    raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")


def ngram_drafts(token_ids: list[int], k: int, max_ngram: int = 3) -> list[int]:
  """Prompt lookup: the (up to) k tokens that followed the latest earlier occurrence of the longest suffix n-gram,
  n >= 2 (1-gram drafts were accepted 9-15% of the time on a chat workload and cost more than they gave)."""
  ids = np.asarray(token_ids)
  for n in range(min(max_ngram, len(ids) - 1), 1, -1):
    hits = np.flatnonzero((np.lib.stride_tricks.sliding_window_view(ids[:-1], n) == ids[-n:]).all(1))
    if len(hits):
      return ids[hits[-1] + n : hits[-1] + n + k].tolist()
  return []


def num_accepted(drafts: list[int], sampled: list[int]) -> int:
  """Sampled tokens kept: each row's token up to and including the first that differs from its draft."""
  return next((i + 1 for i, (d, t) in enumerate(zip(drafts, sampled)) if d != t), len(sampled))


Prompts = str | list[str] | list[list[int]]  # one prompt or many, as text or token ids


@dataclass
class RequestOutput:
  request_id: str
  prompt_token_ids: list[int]
  token_ids: list[int] = field(default_factory=list)
  text: str = ""
  delta_token_ids: list[int] = field(default_factory=list)
  delta_text: str = ""
  finished: bool = False
  finish_reason: str | None = None  # stop | length | abort | error
  num_cached_tokens: int = 0
  error: str | None = None
  logprobs: list[Logprob] | None = None  # per output token so far, when the request asks


class LLMEngine:
  """add_request / step / abort over continuous batching. Not thread-safe: one thread drives it."""

  def __init__(self, model: str | Path | ModelFiles, **kwargs):
    self.config = config = EngineConfig(**kwargs)
    self.device = resolve_device(config.device)
    files = model if isinstance(model, ModelFiles) else load_model_files(model, self.device)
    self.model_config, self.tokenizer, self.files = files.config, files.tokenizer, files
    self.eos_token_ids = set(files.eos_token_ids)
    dtype_name = resolve_dtype(config.dtype, self.device)
    dtype = getattr(dtypes, dtype_name)
    num_blocks = config.num_blocks or num_kv_blocks(files.config, config.block_size, dtype_name, config.kv_cache_gb)
    self.max_model_len = self._max_model_len(num_blocks)
    self.quantize = resolve_quantize(config.quantize, files.weights, model if isinstance(model, (str, Path)) else None)
    panels = on_cpu(self.device) or self.quantize is not None  # kernels/linear.py
    weights = prepare_weights(files.weights, dtype, self.quantize, panels)  # empties files.weights
    self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
    self.scheduler = Scheduler(config, self.block_manager)
    decoder = Model(files.config, weights, num_blocks, config.block_size, dtype)
    max_blocks = block_table_width(self.max_model_len, config.block_size)
    self.runner = ModelRunner(decoder, self.device, config.block_size, max_blocks, config.beam)
    # the sampling defaults and where they come from (generation_config.json, else llama.cpp's)
    self.default_params, self.default_params_source = SamplingParams.from_generation_config(files.generation_config)
    self.seqs: dict[str, Sequence] = {}
    self._detok: dict[str, Detokenizer] = {}
    self._counter = itertools.count()
    self.num_prompt_tokens = self.num_generated_tokens = self.num_draft_tokens = self.num_accepted_drafts = 0
    self.last_step_timings: dict[str, float] = {}  # seconds spent in each phase of the last step (profiling)

  def _max_model_len(self, num_blocks: int) -> int:
    """The config's cap, the model's context, and what the KV pool holds: the smallest; a note when it is the pool."""
    model_len = self.model_config.max_position_embeddings
    wanted = min(self.config.max_model_len or model_len, model_len)
    kv_capacity = (num_blocks - 1) * self.config.block_size
    if kv_capacity < wanted:
      self.files.notes.append(f"context capped at {kv_capacity} tokens by the KV cache budget (not {wanted})")
    return min(wanted, kv_capacity)

  # ---- requests ----
  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: list[int]) -> str:
    return self.tokenizer.decode(ids, skip_special_tokens=True)

  def apply_chat_template(self, messages: list[dict], tokenize: bool = True, **kwargs) -> list[int] | str:
    """The model's own chat template (jinja2); kwargs reach the template (add_generation_prompt, enable_thinking)."""
    text = render_chat(self.files.chat_template, messages, self.files.special_tokens, **kwargs)
    return self.encode(text, add_special_tokens=False) if tokenize else text

  def add_request(
    self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
  ) -> str:
    params = params or self.default_params
    if params.seed is None:
      params = replace(params, seed=random.getrandbits(32))  # the request's sampling stays reproducible
    ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
    check_prompt(ids, self.max_model_len, self.model_config.vocab_size)
    request_id = request_id or f"req-{next(self._counter)}"
    if request_id in self.seqs:
      raise ValueError(f"request id {request_id!r} is already in use")
    seq = Sequence(request_id, ids, params, arrival_index=next(self._counter))
    seq.matcher = self._matcher(params.grammar) if params.grammar else None
    self.seqs[request_id], self._detok[request_id] = seq, Detokenizer()
    self.scheduler.add(seq)
    self.num_prompt_tokens += len(ids)
    return request_id

  def _matcher(self, grammar: str):
    """An llguidance matcher of the grammar over this model's vocabulary; ValueError naming a bad grammar."""
    import llguidance

    if not hasattr(self, "_ll_tokenizer"):  # ~0.2 s for a 49k vocabulary: once per engine
      eos = sorted(self.eos_token_ids)
      self._ll_tokenizer = llguidance.LLTokenizer(self.tokenizer.to_str(), self.model_config.vocab_size, eos)
    matcher = llguidance.LLMatcher(self._ll_tokenizer, grammar, log_level=0)
    if matcher.is_error():
      raise ValueError(f"grammar: {matcher.get_error()}")
    return matcher

  def abort(self, request_id: str) -> RequestOutput | None:
    if (seq := self.seqs.get(request_id)) is None:
      return None
    self.scheduler.finish(seq, "abort")
    return self._output(seq, [])

  def has_unfinished_requests(self) -> bool:
    return self.scheduler.has_unfinished()

  def last_logits(self) -> np.ndarray:
    """float32 logits of the last step: row i for the i-th sequence sampled then (rows past them are padding)."""
    return self.runner.last_logits.numpy()

  def captured_shapes(self) -> list[BatchShape]:
    """The batch shapes captured so far (each a set of TinyJits)."""
    return list(self.runner.inputs)

  def stats(self) -> dict:
    bm = self.block_manager
    return {
      "num_running": len(self.scheduler.running),
      "num_waiting": len(self.scheduler.waiting),
      "kv_cache_usage": 1 - bm.num_free_blocks / bm.num_total_blocks,
      "num_prompt_tokens": self.num_prompt_tokens,
      "num_generated_tokens": self.num_generated_tokens,
      "num_draft_tokens": self.num_draft_tokens,  # verified; accepted ones follow
      "num_accepted_drafts": self.num_accepted_drafts,
      "num_cached_tokens": bm.num_hit_tokens,
      "prefix_cache_hit_rate": bm.num_hit_tokens / max(bm.num_queried_tokens, 1),
      "num_free_blocks": bm.num_free_blocks,
      "num_total_blocks": bm.num_total_blocks,
    }

  # ---- one step of continuous batching ----
  def step(self) -> list[RequestOutput]:
    t0 = time.perf_counter()
    self._propose_drafts()
    if not (scheduled := self.scheduler.schedule()):
      return []
    t1 = time.perf_counter()
    sampled, next_ids = self.runner.execute(scheduled)
    t2 = time.perf_counter()
    rows: dict[Sequence, list[int]] = {}  # a sequence's sampled rows: one, or one per draft and one more
    for row, (seq, token_id) in enumerate(zip(sampled, next_ids)):
      rows.setdefault(seq, []).append(token_id)
      if seq.sampling_params.logprobs is not None:
        seq.logprobs.append(self._logprob(row, token_id, seq.sampling_params.logprobs))
    accepted = {seq: ids[: num_accepted(seq.spec_token_ids, ids)] for seq, ids in rows.items()}
    self.num_draft_tokens += len(sampled) - len(rows)
    self.num_accepted_drafts += sum(map(len, accepted.values())) - len(rows)
    for seq, n in scheduled:  # a rejected draft's KV slot is written again later
      seq.num_computed_tokens += n - len(rows.get(seq, ())) + len(accepted.get(seq, ()))
      self.block_manager.cache_full_blocks(seq)
      seq.spec_token_ids = []
    outputs = [self._append_tokens(seq, ids) for seq, ids in accepted.items()]
    self.last_step_timings = {
      "schedule_s": t1 - t0,
      **self.runner.last_timings,
      "postprocess_s": time.perf_counter() - t2,
      "num_tokens": sum(n for _, n in scheduled),
      "num_seqs": len(sampled),
    }
    return outputs

  def _logprob(self, row: int, token_id: int, k: int) -> Logprob:
    chosen, values, token_ids = (a[row] for a in self.runner.last_logprobs)
    return Logprob(token_id, float(chosen), list(zip(token_ids[:k].tolist(), values[:k].tolist())))

  def _propose_drafts(self) -> None:
    """Prompt lookup, no draft model: a decoding sequence's next tokens guessed from the tokens so far, verified as
    extra rows of its chunk. Not for rows whose logits depend on the output (penalties, grammars, logprobs)."""
    k = self.config.num_speculative_tokens
    for seq in self.scheduler.running if k else ():
      seq.spec_token_ids, p = [], seq.sampling_params
      room = min(k, p.max_tokens - len(seq.output_token_ids) - 1, self.max_model_len - seq.num_tokens - 1)
      plain = not (p.penalized or seq.matcher or p.logprobs is not None)
      if plain and room > 0 and seq.num_computed_tokens == seq.num_tokens - 1:
        seq.spec_token_ids = ngram_drafts(seq.token_ids, room)

  def _append_tokens(self, seq: Sequence, token_ids: list[int]) -> RequestOutput:
    detok = self._detok[seq.request_id]
    for i, token_id in enumerate(token_ids):
      seq.output_token_ids.append(token_id)
      if seq.matcher:
        seq.matcher.consume_token(token_id)
      if self.tokenizer:
        detok.update(self.tokenizer, seq.output_token_ids)
      if reason := self._finish_reason(seq, token_id, detok):
        self.scheduler.finish(seq, reason)
        token_ids = token_ids[: i + 1]
        break
    self.num_generated_tokens += len(token_ids)
    return self._output(seq, token_ids)

  def _finish_reason(self, seq: Sequence, token_id: int, detok: Detokenizer) -> str | None:
    """stop (an EOS or stop token, or a stop string, which the text then ends before), length, or None."""
    p = seq.sampling_params
    if (token_id in self.eos_token_ids and not p.ignore_eos) or token_id in p.stop_token_ids:
      return "stop"
    if seq.matcher and seq.matcher.is_stopped():  # the grammar is complete
      return "stop"
    if (hit := detok.find_stop(p.stop)) is not None:
      detok.text = detok.text[:hit]
      return "stop"
    if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
      return "length"
    return None

  def _output(self, seq: Sequence, delta_ids: list[int]) -> RequestOutput:
    detok = self._detok[seq.request_id]
    delta_text = detok.take(() if seq.is_finished else seq.sampling_params.stop)  # a finished request flushes the rest
    if seq.is_finished:
      del self.seqs[seq.request_id], self._detok[seq.request_id]
    ids, status = list(seq.output_token_ids), (seq.is_finished, seq.finish_reason, seq.num_cached_tokens)
    logprobs = list(seq.logprobs) if seq.sampling_params.logprobs is not None else None
    text = (detok.text, delta_ids, delta_text)
    return RequestOutput(seq.request_id, seq.prompt_token_ids, ids, *text, *status, logprobs=logprobs)


class LLM:
  """Offline batch generation: LLM(path).generate(prompts, params)."""

  def __init__(self, model: str | Path | ModelFiles, **kwargs):
    self.engine = LLMEngine(model, **kwargs)

  def generate(
    self, prompts: Prompts, params: SamplingParams | list[SamplingParams] | None = None
  ) -> list[RequestOutput]:
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
      prompts = [prompts]
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)
    ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, per_prompt)]
    final: dict[str, RequestOutput] = {}
    while self.engine.has_unfinished_requests():
      final.update((o.request_id, o) for o in self.engine.step() if o.finished)
    return [final[i] for i in ids]

  def chat(self, messages: list[dict], params: SamplingParams | None = None, **template_kwargs) -> RequestOutput:
    return self.generate([self.engine.apply_chat_template(messages, **template_kwargs)], params)[0]
