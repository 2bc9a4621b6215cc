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
from .engine import LLM, LLMEngine, RequestOutput, check_prompt
from .formats.tokenizer import Detokenizer, stop_holdback
from .engine_loop import EngineLoop, RequestStream
from .runner import BatchShape, block_table_width
from .kernels.sampler import hash_uniform
from .sampling import SamplingParams
from .sequence import Logprob, Sequence
