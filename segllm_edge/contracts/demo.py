"""The bundled demo image and the conversation the demo, the drift report and the load benchmarks run."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

DEMO_QUESTIONS = ("Segment the red circle.", "Segment the blue square next to it.[REF:1]",
                  "Segment the object above instance 2.[REF:2]")


def demo_image() -> Path:
    return Path(str(resources.files("segllm_edge").joinpath("assets", "demo_shapes.png")))
