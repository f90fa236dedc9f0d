"""llm-queue-gateway: an OpenAI-compatible gateway with a bounded priority queue in front of a model."""

__version__ = "0.1.0"
