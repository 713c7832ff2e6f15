"""Accuracy on datasets: per-round gIoU / cIoU / P@0.5 (the SegLLM research code's definitions)."""
