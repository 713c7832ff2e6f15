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

# the segllm BLS model's request tensor names (clients and the BLS model use these, never the literals) ...
IN_START, IN_END, IN_CONVERSATION, IN_IMAGE = "start", "end", "conversation", "image"
IN_QUESTION, IN_REFS, IN_WANT_MASK_LOGITS = "question", "refs", "want_mask_logits"
IN_ROUND = "round"
#: ... and the request tensors (no sequence batcher: a conversation is known by its token)
BLS_INPUTS = (
    (IN_START, "TYPE_BOOL", [1], True, False),             # first round: carries the image
    (IN_END, "TYPE_BOOL", [1], True, False),               # last round / close
    (IN_CONVERSATION, "TYPE_STRING", [1], True, False),    # the token a start's response returned
    (IN_IMAGE, "TYPE_STRING", [1], True, False),           # encoded PNG/JPEG bytes, start only
    (IN_QUESTION, "TYPE_STRING", [1], True, False),        # required except for a close
    (IN_REFS, "TYPE_INT32", [-1], True, False),            # round numbers, optional
    (IN_WANT_MASK_LOGITS, "TYPE_BOOL", [1], True, False),  # optional: also return the round's mask_logits
    (IN_ROUND, "TYPE_INT32", [1], True, False),            # optional: the round asked for (a retry is answered again)
)
# the response tensor names: one per field of segllm_edge.runtime.results.RoundResult that crosses the wire
OUT_MASK, OUT_BOX, OUT_MODEL_MASK, OUT_MODEL_BOX, OUT_SCORE = "mask", "box", "model_mask", "model_box", "score"
OUT_ROUND, OUT_QUERY_INDEX, OUT_NEW_TOKENS, OUT_CONTEXT_TOKENS = "round", "query_index", "new_tokens", "context_tokens"
OUT_MEMORY, OUT_TIMINGS, OUT_CONVERSATION, OUT_MASK_LOGITS = "memory", "timings", "conversation", "mask_logits"
#: the segllm BLS model's response tensors, in order
BLS_OUTPUTS = (
    (OUT_MASK, "TYPE_STRING", [1], False, False),           # PNG (1-bit) of the original-size mask
    (OUT_BOX, "TYPE_FP32", [4], False, False),
    (OUT_MODEL_MASK, "TYPE_STRING", [1], False, False),     # PNG (1-bit) of the 1024x1024 mask in the model's frame
    (OUT_MODEL_BOX, "TYPE_FP32", [4], False, False),
    (OUT_SCORE, "TYPE_FP32", [1], False, False),
    (OUT_ROUND, "TYPE_INT32", [1], False, False),
    (OUT_QUERY_INDEX, "TYPE_INT32", [1], False, False),     # the foreground query that won
    (OUT_NEW_TOKENS, "TYPE_INT32", [1], False, False),      # tokens prefilled this round
    (OUT_CONTEXT_TOKENS, "TYPE_INT32", [1], False, False),  # conversation length after this round
    (OUT_MEMORY, "TYPE_STRING", [1], False, False),         # JSON: bytes held (kv_cache, session_state)
    (OUT_TIMINGS, "TYPE_STRING", [1], False, False),        # JSON: per-stage ms (the local stage names) + serving
    (OUT_CONVERSATION, "TYPE_STRING", [1], False, False),   # the conversation's token (drawn at start)
    (OUT_MASK_LOGITS, "TYPE_FP32", [-1, -1], False, False), # (256, 256) logits; only with want_mask_logits
)
OUTPUT_NAMES = tuple(t[0] for t in BLS_OUTPUTS)
#: the outputs every response carries (mask_logits only when asked for)
ALWAYS_OUTPUTS = tuple(n for n in OUTPUT_NAMES if n != OUT_MASK_LOGITS)
#: keys of the ``timings`` JSON that are the serving layer's, not stages of the round (segllm_edge.runtime.profiler)
SERVING_TIMINGS = ("bls_model_calls", "bls_in_process", "bls_total", "bls_overhead",
                   "state_bytes", "state_save_ms", "state_write_ms")   # the durable state's write (serve --state-dir)
TIMINGS_CALLS = "calls"      # ... and the per-model call times, a nested {model: ms}
TIMINGS_IN_PROCESS = "in_process"   # ... and the BLS_GRAPHS' times in the BLS process, a nested {graph: ms}

#: preprocess (and the encode_image ensemble): encoded image bytes in ...
IMAGE_BYTES = ("image", "TYPE_STRING", [1])
#: ... CLIP pixels and the HIPIE input out (fed to vision_encoder / mask_backbone) ...
PIXEL_VALUES, HIPIE_IMAGE = "pixel_values", "hipie_image"
#: ... and what the preprocess model passes through besides the graphs' inputs (the encode_image ensemble returns them)
PREPROCESS_PASSTHROUGH = ("resized_padded", "input_hw")
PREPROCESS_OUTPUTS = (PIXEL_VALUES, HIPIE_IMAGE, *PREPROCESS_PASSTHROUGH)
#: what the encode_image ensemble returns besides mask_backbone's features (the BLS runs CLIP on the pixels)
ENCODE_IMAGE_PASSTHROUGH = (PIXEL_VALUES, *PREPROCESS_PASSTHROUGH)

# config.pbtxt parameters
PARAM_EXPORT_DIR = "segllm_export_dir"            # BLS: the export folder
PARAM_MAX_CONVERSATIONS = "segllm_max_conversations"
PARAM_IDLE_TIMEOUT = "segllm_idle_timeout_s"
PARAM_MAX_SESSION_BYTES = "segllm_max_session_bytes"   # BLS: per-conversation memory budget (optional)
PARAM_STATE_DIR = "segllm_state_dir"              # BLS: durable conversations in this directory (optional)
PARAM_REDIS_URL = "segllm_redis_url"              # BLS: ... or in this Redis (optional; replicas share it)
PARAM_STATE_MAX_BYTES = "segllm_state_max_bytes"  # BLS: stored bytes per conversation (optional)
PARAM_STATE_MAX_TOTAL_BYTES = "segllm_state_max_total_bytes"  # BLS: stored bytes in total (optional)
PARAM_MAX_CONCURRENT_ROUNDS = "segllm_max_concurrent_rounds"   # BLS: rounds (of different conversations) at once
PARAM_MAX_QUEUED_ROUNDS = "segllm_max_queued_rounds"           # BLS: rounds waiting for a slot, all conversations
PARAM_MAX_PENDING_PER_CONVERSATION = "segllm_max_pending_per_conversation"  # BLS: one conversation's running + waiting
#: their defaults: 4 rounds at once; one conversation may send its next round while one runs; at most
#: 2 x max_conversations waiting (a queued round waits for at most ~that many rounds / 4 before it starts)
DEFAULT_MAX_CONCURRENT_ROUNDS = 4
DEFAULT_MAX_PENDING_PER_CONVERSATION = 2
PARAM_AXES = "segllm_input_axes"          # graph models: JSON {input: [dim or axis name, ...]} (the manifest's)
PARAM_AXIS_LIMITS = "segllm_axis_limits"  # graph models: JSON {axis: max} (segllm_edge.limits.graph_axis_limits)
PARAM_GRAPH_FILE = "segllm_graph_file"            # graph models: the .onnx file
PARAM_THREADS = "segllm_threads"                  # graph models and the BLS (its in-process graphs)
PARAM_GRAPH_ENGINE = "segllm_graph_engine"        # graph models (--target python): what runs the .onnx file
#: the engines a python-backend graph model can run its graph on (CPU). onnxruntime, the default, gives the
#: answers of ``load(export, backend="onnxruntime")`` bit for bit; openvino runs the HIPIE graphs ~1.4x faster
#: on a CPU (docs/cpu.md), masks equal up to a few boundary pixels (summation order)
GRAPH_ENGINE_ORT = "onnxruntime"
GRAPH_ENGINE_OPENVINO = "openvino"
GRAPH_ENGINES = (GRAPH_ENGINE_ORT, GRAPH_ENGINE_OPENVINO)
PARAM_CLIP_SIZE = "segllm_clip_image_size"        # preprocess
