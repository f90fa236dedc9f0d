"""The local backend: a GGUF model run in process by llama.cpp, with continuous batching over its slots."""

from app.backends.llama.backend import LlamaBackend, default_model_path

__all__ = ["LlamaBackend", "default_model_path"]
