from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .sequence import Sequence


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
  return hash((parent_hash, token_ids))


@dataclass(eq=False)
class Block:
  block_id: int
  ref_count: int = 0
  version: int = 0  # bumped on reuse, so a cached child can verify its parent is still the same block
  block_hash: int | None = None
  token_ids: tuple[int, ...] = ()
  parent: tuple[int, int] | None = None  # (block_id, version) of the previous block in the chain

  def reuse(self) -> None:
    """Handed out again: one owner, no longer a cached prefix."""
    self.ref_count = 1
    self.block_hash = None
    self.token_ids = ()
    self.parent = None
    self.version += 1

  def set_prefix(self, token_ids: tuple[int, ...], prev: Block | None) -> None:
    """Full and computed: findable by the hash chained over the previous block's hash and these token ids."""
    self.token_ids = token_ids
    self.block_hash = hash_block(prev.block_hash if prev else None, token_ids)
    self.parent = (prev.block_id, prev.version) if prev else None


class BlockManager:
  """Fixed-size KV blocks with ref counts; full blocks are findable by a chained hash (prefix cache).
  Block 0 is never handed out: padded token rows write into it."""

  def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
    self.block_size, self.enable_prefix_caching = block_size, enable_prefix_caching
    self.num_total_blocks = num_blocks - 1  # block 0 is reserved
    self.blocks = [Block(i) for i in range(num_blocks)]
    self.free_block_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))  # LRU first
    self.cached_blocks: dict[int, Block] = {}  # block_hash -> block
    self.num_queried_tokens = 0
    self.num_hit_tokens = 0

  @property
  def num_free_blocks(self) -> int:
    return len(self.free_block_ids)

  def allocate_cached_prefix(self, seq: Sequence) -> None:
    """Admission: share the longest run of cached full blocks; the last token is always computed."""
    assert not seq.block_table
    bs, token_ids = self.block_size, seq.token_ids
    parent_hash, parent = None, None
    # without prefix caching nothing is ever cached: the loop stops at once
    for start in range(0, (seq.num_tokens - 1) // bs * bs, bs):
      chunk = tuple(token_ids[start : start + bs])
      block_hash = hash_block(parent_hash, chunk)
      block = self.cached_blocks.get(block_hash)
      if block is None or block.token_ids != chunk or block.parent != parent:
        break  # never trust the hash alone
      if block.ref_count == 0:
        del self.free_block_ids[block.block_id]
      block.ref_count += 1
      seq.block_table.append(block.block_id)
      parent_hash, parent = block_hash, (block.block_id, block.version)
    seq.num_computed_tokens = len(seq.block_table) * bs
    if seq.num_preemptions == 0:  # count each request once, at its first admission
      seq.num_cached_tokens = seq.num_computed_tokens
      self.num_queried_tokens += len(seq.prompt_token_ids)
      self.num_hit_tokens += seq.num_cached_tokens

  def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
    num_tokens = seq.num_computed_tokens + num_new_tokens
    return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

  def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
    return self.num_blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

  def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
    for _ in range(self.num_blocks_needed(seq, num_new_tokens)):
      block_id, _ = self.free_block_ids.popitem(last=False)  # the least recently freed block
      block = self.blocks[block_id]
      if self.cached_blocks.get(block.block_hash) is block:
        del self.cached_blocks[block.block_hash]  # it leaves the prefix cache
      block.reuse()
      seq.block_table.append(block_id)

  def cache_full_blocks(self, seq: Sequence) -> None:
    """Make the sequence's computed full blocks findable by later requests."""
    if not self.enable_prefix_caching:
      return
    bs, token_ids = self.block_size, None
    for i in range(seq.num_computed_tokens // bs):
      block = self.blocks[seq.block_table[i]]
      if block.block_hash is not None:
        continue
      token_ids = token_ids or seq.token_ids
      prev = self.blocks[seq.block_table[i - 1]] if i else None
      block.set_prefix(tuple(token_ids[i * bs : (i + 1) * bs]), prev)
      self.cached_blocks.setdefault(block.block_hash, block)

  def free(self, seq: Sequence) -> None:
    for block_id in reversed(seq.block_table):  # tail blocks become the first to be evicted
      block = self.blocks[block_id]
      block.ref_count -= 1
      assert block.ref_count >= 0, f"block {block_id} freed twice"
      if block.ref_count == 0:
        self.free_block_ids[block_id] = None
    seq.block_table = []
    seq.num_computed_tokens = 0
