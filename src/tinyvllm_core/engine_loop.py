from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field

from .engine import LLMEngine, RequestOutput
from .sampling import SamplingParams


@dataclass(eq=False)
class RequestStream:
  """One request's outputs, read by the caller's thread; timings are stamped by the engine loop."""

  request_id: str
  arrival_time: float = field(default_factory=time.perf_counter)
  first_token_time: float | None = None
  finish_time: float | None = None
  _queue: queue.Queue = field(default_factory=queue.Queue)

  @property
  def ttft(self) -> float | None:
    return None if self.first_token_time is None else self.first_token_time - self.arrival_time

  def get(self, timeout: float | None = None) -> RequestOutput | None:
    """The next output, or None when none came within timeout seconds."""
    try:
      return self._queue.get(timeout=timeout)
    except queue.Empty:
      return None

  def __iter__(self):
    while not (out := self._queue.get()).finished:
      yield out
    yield out  # the final output

  def result(self) -> RequestOutput:
    """The final output; earlier ones are dropped as they come."""
    return collections.deque(self, maxlen=1)[0]


class EngineLoop:
  """A background thread owns the engine and steps continuous batching; any thread may submit, read its own stream,
  or abort."""

  def __init__(self, engine: LLMEngine):
    self.engine = engine
    self._inbox: queue.Queue = queue.Queue()
    self._streams: dict[str, RequestStream] = {}
    self._ids, self._stopped = itertools.count(), threading.Event()
    self._stats = engine.stats()
    self._thread = threading.Thread(target=self._run, name="tinyvllm-engine", daemon=True)
    self._thread.start()

  def submit(
    self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
  ) -> RequestStream:
    stream = RequestStream(request_id or f"stream-{next(self._ids)}")
    self._inbox.put(("add", stream, prompt, params))
    return stream

  def abort(self, request_id: str) -> None:
    self._inbox.put(("abort", request_id))

  def stats(self) -> dict:
    return dict(self._stats)  # a snapshot taken by the loop after each step

  def shutdown(self) -> None:
    """Stop the loop; requests still in flight end with finish_reason "abort"."""
    self._stopped.set()
    self._inbox.put(("wake",))
    self._thread.join()
    while not self._inbox.empty():
      self._handle(self._inbox.get_nowait())
    for out in self._abort_all():
      self._deliver(out)

  def _abort_all(self) -> list[RequestOutput]:
    return [out for rid in list(self._streams) if (out := self.engine.abort(rid)) is not None]

  def _handle(self, msg: tuple) -> None:
    if msg[0] == "add":
      _, stream, prompt, params = msg
      try:
        self._streams[self.engine.add_request(prompt, params, stream.request_id)] = stream
      except ValueError as e:
        stream._queue.put(RequestOutput(stream.request_id, [], finished=True, finish_reason="error", error=str(e)))
    elif msg[0] == "abort" and (out := self.engine.abort(msg[1])) is not None:
      self._deliver(out)

  def _deliver(self, out: RequestOutput) -> None:
    if (stream := self._streams.get(out.request_id)) is None:
      return
    now = time.perf_counter()
    if stream.first_token_time is None and out.token_ids:
      stream.first_token_time = now
    if out.finished:
      stream.finish_time = now
      del self._streams[out.request_id]
    stream._queue.put(out)

  def _step(self) -> list[RequestOutput]:
    try:
      return self.engine.step()
    except Exception as e:  # a failed step fails its requests, never the loop
      outputs = self._abort_all()
      for out in outputs:
        out.finish_reason, out.error = "error", f"engine step failed: {e!r}"
      return outputs

  def _run(self) -> None:
    while not self._stopped.is_set():
      if not self.engine.has_unfinished_requests():
        self._handle(self._inbox.get())  # idle: sleep until a message
      while not self._inbox.empty():
        self._handle(self._inbox.get_nowait())
      if self.engine.has_unfinished_requests():
        for out in self._step():
          self._deliver(out)
      self._stats = self.engine.stats()
