from .config import ConfigError, EngineConfig, ModelConfig
from .engine import LLM, LLMEngine, RequestOutput
from .engine_loop import EngineLoop, RequestStream
from .sampling import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineLoop", "RequestStream", "RequestOutput", "SamplingParams", "EngineConfig", "ModelConfig", "ConfigError"]
