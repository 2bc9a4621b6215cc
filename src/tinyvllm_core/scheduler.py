from __future__ import annotations

from collections import deque

from .block_manager import BlockManager
from .config import EngineConfig
from .sequence import Sequence, SequenceStatus


def _num_uncomputed(seq: Sequence) -> int:
  return seq.num_tokens - seq.num_computed_tokens


class Scheduler:
  """Continuous batching: every step decodes the running sequences first, then fills the token budget with prefill
  chunks (running ones, then waiting ones). Out of blocks, the newest unscheduled running sequence is preempted: its
  blocks are freed and it is recomputed later."""

  def __init__(self, config: EngineConfig, block_manager: BlockManager):
    self.config, self.block_manager = config, block_manager
    self.waiting: deque[Sequence] = deque()
    self.running: list[Sequence] = []

  def add(self, seq: Sequence) -> None:
    self.waiting.append(seq)

  def has_unfinished(self) -> bool:
    return bool(self.waiting or self.running)

  def schedule(self) -> list[tuple[Sequence, int]]:
    """(sequence, num_new_tokens) to run this step."""
    scheduled: list[tuple[Sequence, int]] = []
    budget = self._schedule_running(scheduled, self.config.max_num_batched_tokens)
    self._schedule_waiting(scheduled, budget)
    return scheduled

  def _schedule_running(self, scheduled: list[tuple[Sequence, int]], budget: int) -> int:
    queue = sorted(self.running, key=lambda s: _num_uncomputed(s) > 1)  # decodes first (stable)
    while queue and budget > 0:
      seq = queue.pop(0)
      num_new = min(_num_uncomputed(seq), budget)
      while not self.block_manager.can_allocate(seq, num_new) and queue:
        victim = max(queue, key=lambda s: s.arrival_index)
        queue.remove(victim)
        self._preempt(victim)
      if not self.block_manager.can_allocate(seq, num_new):
        self._preempt(seq)
        continue
      self.block_manager.allocate(seq, num_new)
      scheduled.append((seq, num_new))
      budget -= num_new
    return budget

  def _schedule_waiting(self, scheduled: list[tuple[Sequence, int]], budget: int) -> None:
    while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
      seq = self.waiting[0]
      self.block_manager.allocate_cached_prefix(seq)
      num_new = min(_num_uncomputed(seq), budget)
      if not self.block_manager.can_allocate(seq, num_new):
        self.block_manager.free(seq)
        break
      self.block_manager.allocate(seq, num_new)
      seq.status = SequenceStatus.RUNNING
      self.running.append(self.waiting.popleft())
      scheduled.append((seq, num_new))
      budget -= num_new

  def _preempt(self, seq: Sequence) -> None:
    seq.spec_token_ids = []
    self.block_manager.free(seq)
    self.running.remove(seq)
    seq.status = SequenceStatus.WAITING
    seq.num_preemptions += 1
    self.waiting.appendleft(seq)

  def finish(self, seq: Sequence, reason: str) -> None:
    if seq.status is SequenceStatus.RUNNING:
      self.running.remove(seq)
    elif seq.status is SequenceStatus.WAITING:
      self.waiting.remove(seq)
    if seq.block_table:
      self.block_manager.free(seq)
    seq.status = SequenceStatus.FINISHED
    seq.finish_reason = reason
