import os, shutil
# tinygrad compiles CPU kernels with $CC (default clang); clang >= 19 vectorizes our register blocks 8-wide (model.py),
# so the newest clang-N on PATH is used unless CC is set.
if "CC" not in os.environ and (clang := next((f"clang-{v}" for v in range(30, 18, -1) if shutil.which(f"clang-{v}")), None)):
  os.environ["CC"] = clang
from .config import ConfigError, EngineConfig, ModelConfig
from .engine import LLM, LLMEngine, RequestOutput
from .engine_loop import EngineLoop, RequestStream
from .sampling import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineLoop", "RequestStream", "RequestOutput", "SamplingParams", "EngineConfig", "ModelConfig", "ConfigError"]
