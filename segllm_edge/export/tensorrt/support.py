"""TensorRT's own ONNX parser support check (``build-engines --check-only`` when tensorrt is importable)."""
from __future__ import annotations


def parser_support(plans) -> dict[str, list[str]] | None:
    """graph → problems TensorRT's ONNX parser reports for it (``supports_model_v2``: every subgraph it could
    not take, with its nodes); None when tensorrt cannot be imported (the caller falls back to the static
    op table of :mod:`.ops`). Needs no GPU: only the parser runs."""
    try:
        import tensorrt as trt
    except (ImportError, OSError):
        return None
    from ...contracts.engines import check_trt_version

    check_trt_version(str(trt.__version__))
    logger = trt.Logger(trt.Logger.WARNING)
    out: dict[str, list[str]] = {}
    for plan in plans:
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        problems: list[str] = []
        if not parser.supports_model_v2(plan.onnx.read_bytes(), str(plan.onnx)):
            for i in range(parser.num_subgraphs):
                if not parser.is_subgraph_supported(i):
                    nodes = list(parser.get_subgraph_nodes(i))
                    problems.append(f"subgraph {i} ({len(nodes)} node(s), first node index {nodes[:1]}) is not supported")
            problems += [str(parser.get_error(i)) for i in range(parser.num_errors)]
            problems = problems or ["the parser does not support this graph (no detail given)"]
        out[plan.graph] = problems
    return out
