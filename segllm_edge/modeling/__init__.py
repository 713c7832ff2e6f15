"""The PyTorch reference of the released SegLLM (needs the [export] extra: torch, transformers)."""
