"""``python -m segllm_edge.serving MODEL_REPOSITORY``: run Triton set up like :class:`TritonServer`."""
import sys

from .tritonserver import main

sys.exit(main())
