"""LLM gateway: base and instruct models behind one door, served by vLLM workers."""

__version__ = "0.1.0"
