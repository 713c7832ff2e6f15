"""The serving contract: model names of the Triton repository, the ``segllm`` BLS model's request and
response tensors, the ``preprocess`` model's tensors and the config parameter names.

Read by the repository generator, the python-backend models and the client (:mod:`segllm_edge.client`).
Tensors are ``(name, Triton data type, dims, optional, allow_ragged_batch)``; documented for users in
triton_models/README.md.
"""
from __future__ import annotations

BLS_MODEL = "segllm"
ENCODE_IMAGE = "encode_image"      # the ensemble: preprocess → mask_backbone
PREPROCESS_MODEL = "preprocess"
#: the graphs the segllm BLS process runs itself with onnxruntime (segllm_edge.serving.bls_graphs): the llm,
#: so a conversation's KV cache never leaves the process that holds the conversation, and both CLIP graphs,
#: whose common weights (the CLIP tower, mm_projector) that process holds once. The repository has no model
#: for them.
BLS_GRAPHS = ("llm", "vision_encoder", "mask_encoder")

#: the segllm BLS model's request tensors (no sequence batcher: a conversation is known by its token)
BLS_INPUTS = (
    ("start", "TYPE_BOOL", [1], True, False),             # first round: carries the image
    ("end", "TYPE_BOOL", [1], True, False),               # last round / close
    ("conversation", "TYPE_STRING", [1], True, False),    # the token a start's response returned
    ("image", "TYPE_STRING", [1], True, False),           # encoded PNG/JPEG bytes, start only
    ("question", "TYPE_STRING", [1], True, False),        # required except for a close
    ("refs", "TYPE_INT32", [-1], True, False),            # round numbers, optional
)
#: the segllm BLS model's response tensors, in order
BLS_OUTPUTS = (
    ("mask", "TYPE_STRING", [1], False, False),           # PNG (1-bit) of the original-size mask
    ("box", "TYPE_FP32", [4], False, False),
    ("model_box", "TYPE_FP32", [4], False, False),
    ("score", "TYPE_FP32", [1], False, False),
    ("round", "TYPE_INT32", [1], False, False),
    ("timings", "TYPE_STRING", [1], False, False),        # JSON: per-stage ms, BLS overhead
    ("conversation", "TYPE_STRING", [1], False, False),   # the conversation's token (drawn at start)
)
OUTPUT_NAMES = tuple(t[0] for t in BLS_OUTPUTS)

#: preprocess (and the encode_image ensemble): encoded image bytes in ...
IMAGE_BYTES = ("image", "TYPE_STRING", [1])
#: ... CLIP pixels and the HIPIE input out (fed to vision_encoder / mask_backbone) ...
PIXEL_VALUES, HIPIE_IMAGE = "pixel_values", "hipie_image"
#: ... and what the ensemble passes through to the BLS model besides the graphs' outputs
PREPROCESS_PASSTHROUGH = ("resized_padded", "input_hw")
PREPROCESS_OUTPUTS = (PIXEL_VALUES, HIPIE_IMAGE, *PREPROCESS_PASSTHROUGH)
#: what the encode_image ensemble returns besides mask_backbone's features (the BLS runs CLIP on the pixels)
ENCODE_IMAGE_PASSTHROUGH = (PIXEL_VALUES, *PREPROCESS_PASSTHROUGH)

# config.pbtxt parameters
PARAM_EXPORT_DIR = "segllm_export_dir"            # BLS: the export folder
PARAM_MAX_CONVERSATIONS = "segllm_max_conversations"
PARAM_IDLE_TIMEOUT = "segllm_idle_timeout_s"
PARAM_MAX_SESSION_BYTES = "segllm_max_session_bytes"   # BLS: per-conversation memory budget (optional)
PARAM_AXES = "segllm_input_axes"          # graph models: JSON {input: [dim or axis name, ...]} (the manifest's)
PARAM_AXIS_LIMITS = "segllm_axis_limits"  # graph models: JSON {axis: max} (segllm_edge.limits.graph_axis_limits)
PARAM_GRAPH_FILE = "segllm_graph_file"            # graph models: the .onnx file
PARAM_THREADS = "segllm_threads"                  # graph models and the BLS (its in-process graphs)
PARAM_CLIP_SIZE = "segllm_clip_image_size"        # preprocess
