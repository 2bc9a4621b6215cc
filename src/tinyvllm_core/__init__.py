"""tinyvllm's engine: paged KV cache, continuous batching, batched TinyJit decode, prefix cache."""

from .block_manager import BlockManager
from .config import (
  ConfigError,
  EngineConfig,
  ModelConfig,
  kv_bytes_per_block,
  num_kv_blocks,
  resolve_device,
  resolve_dtype,
)
from .engine import LLM, LLMEngine, RequestOutput, check_prompt, stop_holdback
from .engine_loop import EngineLoop, RequestStream
from .runner import BatchShape, block_table_width
from .sampling import SamplingParams, hash_uniform
from .sequence import Sequence

__all__ = [
  "LLM",
  "LLMEngine",
  "EngineLoop",
  "RequestStream",
  "RequestOutput",
  "SamplingParams",
  "EngineConfig",
  "ModelConfig",
  "ConfigError",
  "BlockManager",
  "Sequence",
  "BatchShape",
  "block_table_width",
  "check_prompt",
  "stop_holdback",
  "hash_uniform",
  "kv_bytes_per_block",
  "num_kv_blocks",
  "resolve_device",
  "resolve_dtype",
]
