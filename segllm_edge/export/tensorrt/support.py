"""TensorRT's own ONNX parser support check (``build-engines --check-only`` when tensorrt is importable).

The parser's check changed between releases: TensorRT 10.0 has ``supports_model(model, path)``, which returns
``(supported, [(node indices, supported), ...])``; 10.1 added ``supports_model_v2`` with ``num_subgraphs`` /
``is_subgraph_supported`` / ``get_subgraph_nodes`` and deprecated the first; a parser with neither is asked to
``parse`` the graph and its errors are the answer.
"""
from __future__ import annotations


def _subgraph_problem(i: int, nodes: list) -> str:
    return f"subgraph {i} ({len(nodes)} node(s), first node index {nodes[:1]}) is not supported"


def parser_problems(parser, model: bytes, path: str) -> list[str]:
    """What ``parser`` (a ``tensorrt.OnnxParser``) reports against the serialized graph; empty when it supports
    every node. Uses the check the installed TensorRT has (see the module's docstring)."""
    problems: list[str] = []
    if hasattr(parser, "supports_model_v2"):          # TensorRT >= 10.1
        if parser.supports_model_v2(model, path):
            return []
        for i in range(parser.num_subgraphs):
            if not parser.is_subgraph_supported(i):
                problems.append(_subgraph_problem(i, list(parser.get_subgraph_nodes(i))))
    elif hasattr(parser, "supports_model"):           # TensorRT 10.0
        supported, subgraphs = parser.supports_model(model, path)
        if supported:
            return []
        problems += [_subgraph_problem(i, list(nodes)) for i, (nodes, ok) in enumerate(subgraphs) if not ok]
    elif parser.parse(model, path):
        return []
    problems += [str(parser.get_error(i)) for i in range(parser.num_errors)]
    return problems or ["the parser does not support this graph (no detail given)"]


def parser_support(plans) -> dict[str, list[str]] | None:
    """graph → problems TensorRT's ONNX parser reports for it (every subgraph it could not take, with its
    nodes); None when tensorrt cannot be imported (the caller falls back to the static op table of
    :mod:`.ops`). Needs no GPU: only the parser runs."""
    try:
        import tensorrt as trt
    except (ImportError, OSError):
        return None
    from ...contracts.engines import STRONG, api_generation, check_trt_version

    check_trt_version(str(trt.__version__))
    # TensorRT 11 creates strongly typed networks only; 10 takes either (the check does not depend on it)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) \
        if api_generation(str(trt.__version__)) == STRONG else 0
    logger = trt.Logger(trt.Logger.WARNING)
    out: dict[str, list[str]] = {}
    for plan in plans:
        builder = trt.Builder(logger)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        out[plan.graph] = parser_problems(parser, plan.onnx.read_bytes(), str(plan.onnx))
    return out
