from .config import ConfigError, EngineConfig, ModelConfig
from .engine import LLM, LLMEngine, RequestOutput
from .sampling import SamplingParams

__all__ = ["LLM", "LLMEngine", "RequestOutput", "SamplingParams", "EngineConfig", "ModelConfig", "ConfigError"]
