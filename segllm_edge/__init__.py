"""segllm-edge: fast, faithful SegLLM inference."""
__version__ = "0.1.0"
