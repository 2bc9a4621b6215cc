from __future__ import annotations
import itertools, multiprocessing, signal
from pathlib import Path
from typing import Callable
from tinygrad.helpers import NUM_CPU_THREADS
from .engine import LLMEngine, RequestOutput
from .loader import ModelFiles
from .sampling import SamplingParams

def _serve_replica(conn, model, kwargs: dict, num_threads: int) -> None:
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole process group: the parent decides when replicas stop
  NUM_CPU_THREADS.value = num_threads  # the replicas share the cores: kernels split over fewer threads
  try: engine = LLMEngine(model() if callable(model) else model, **kwargs)  # a callable builds ModelFiles in the replica
  except Exception as e: return conn.send(("error", e))
  conn.send(("ok", (engine.files, engine.config, engine.device, engine.max_model_len)))  # files without weights: the engine dropped them
  while (msg := conn.recv())[0] != "close":
    try: conn.send(("ok", getattr(engine, msg[0])(*msg[1])))
    except Exception as e: conn.send(("error", e))

class ReplicatedEngine:
  """LLMEngine's interface over one engine process per replica, the CPU's cores split between them (one engine splits its big kernels over
  all cores; replicas also skip the per-kernel thread handoff): a request stays on the replica that had the fewest unfinished requests when
  it arrived, and step() steps every busy replica at once. Greedy outputs equal one engine's."""
  encode, decode, apply_chat_template = LLMEngine.encode, LLMEngine.decode, LLMEngine.apply_chat_template

  def __init__(self, model: str | Path | ModelFiles | Callable[[], ModelFiles], num_replicas: int, **kwargs):
    ctx = multiprocessing.get_context("spawn")
    self.conns, children = zip(*(ctx.Pipe() for _ in range(num_replicas)))
    self.procs = [ctx.Process(target=_serve_replica, args=(c, model, kwargs, max(1, NUM_CPU_THREADS.value // num_replicas)), daemon=True) for c in children]
    for p in self.procs: p.start()
    try: infos = [self._recv(i) for i in range(num_replicas)]
    except BaseException: self.shutdown(); raise
    self.files, self.config, self.device, self.max_model_len = infos[0]
    self.model_config, self.tokenizer, self.eos_token_ids = self.files.config, self.files.tokenizer, set(self.files.eos_token_ids)
    self.default_params = SamplingParams.from_generation_config(self.files.generation_config)
    self.owner: dict[str, int] = {}  # request id -> replica
    self.num_unfinished, self._counter = [0] * num_replicas, itertools.count()

  def _recv(self, i: int):
    try: status, value = self.conns[i].recv()
    except EOFError: raise RuntimeError("an engine replica process exited") from None
    if status == "error": raise value
    return value

  def _call(self, i: int, method: str, *args):
    self.conns[i].send((method, args))
    return self._recv(i)

  def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None) -> str:
    request_id = request_id or f"req-{next(self._counter)}"
    if request_id in self.owner: raise ValueError(f"request id {request_id!r} is already in use")
    i = min(range(len(self.conns)), key=lambda r: self.num_unfinished[r])
    self.owner[self._call(i, "add_request", prompt, params, request_id)] = i
    self.num_unfinished[i] += 1
    return request_id

  def step(self) -> list[RequestOutput]:
    busy = [i for i, n in enumerate(self.num_unfinished) if n]
    for i in busy: self.conns[i].send(("step", ()))
    return [self._track(o) for i in busy for o in self._recv(i)]  # the replicas step in parallel

  def _track(self, out: RequestOutput) -> RequestOutput:
    if out.finished: self.num_unfinished[self.owner.pop(out.request_id)] -= 1
    return out

  def abort(self, request_id: str) -> RequestOutput | None:
    out = self._call(self.owner[request_id], "abort", request_id) if request_id in self.owner else None
    return out and self._track(out)

  def has_unfinished_requests(self) -> bool: return any(self.num_unfinished)

  def stats(self) -> dict:
    per_replica = [self._call(i, "stats") for i in range(len(self.conns))]
    total = {k: sum(s[k] for s in per_replica) / (len(per_replica) if k in ("kv_cache_usage", "prefix_cache_hit_rate") else 1) for k in per_replica[0]}
    return {**total, "num_replicas": len(self.conns)}

  def shutdown(self) -> None:
    for conn in self.conns:
      try: conn.send(("close", ()))
      except OSError: pass
    for p in self.procs:
      p.join(timeout=10)
      if p.is_alive(): p.kill()

def make_engine(model: str | Path | ModelFiles | Callable[[], ModelFiles], num_replicas: int = 1, **kwargs) -> LLMEngine | ReplicatedEngine:
  """One engine, or num_replicas engine processes that split kv_cache_gb between them."""
  if num_replicas < 1: raise ValueError(f"num_replicas must be >= 1 (got {num_replicas})")
  if num_replicas == 1: return LLMEngine(model() if callable(model) else model, **kwargs)
  return ReplicatedEngine(model, num_replicas, **{**kwargs, "kv_cache_gb": kwargs.get("kv_cache_gb", 1.0) / num_replicas})
