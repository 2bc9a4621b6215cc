from .config import ConfigError, EngineConfig, ModelConfig
from .engine import LLM, LLMEngine, RequestOutput
from .engine_loop import EngineLoop, RequestStream
from .replicas import ReplicatedEngine, make_engine
from .sampling import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineLoop", "ReplicatedEngine", "make_engine", "RequestStream", "RequestOutput", "SamplingParams", "EngineConfig", "ModelConfig", "ConfigError"]
