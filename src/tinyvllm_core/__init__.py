import os, shutil
# tinygrad compiles CPU kernels with $CC. clang >= 19 vectorizes our register blocks 8-wide once tinygrad stops grouping
# loads into float4 (DMC=1): 2x faster matmuls than clang 14-16, which need the float4 grouping. An explicit CC wins.
if "CC" not in os.environ and (clang := next((f"clang-{v}" for v in range(30, 18, -1) if shutil.which(f"clang-{v}")), None)):
  os.environ.update(CC=clang, DMC=os.environ.get("DMC", "1"))
from .config import ConfigError, EngineConfig, ModelConfig
from .engine import LLM, LLMEngine, RequestOutput
from .engine_loop import EngineLoop, RequestStream
from .replicas import ReplicatedEngine, make_engine
from .sampling import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineLoop", "ReplicatedEngine", "make_engine", "RequestStream", "RequestOutput", "SamplingParams", "EngineConfig", "ModelConfig", "ConfigError"]
