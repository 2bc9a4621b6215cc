"""Model files -> config, weights, tokenizer and chat template (safetensors, GGUF, tokenizers, jinja templates)."""
from ..config import GGUF_ARCHITECTURES, SUPPORTED_ARCHITECTURES
from ..loader import GGUFTensorInfo, ModelFiles, load_model_files, read_gguf_header, render_chat

__all__ = ["GGUF_ARCHITECTURES", "SUPPORTED_ARCHITECTURES", "GGUFTensorInfo", "ModelFiles", "load_model_files", "read_gguf_header", "render_chat"]
