"""TensorRT optimisation profiles (min / opt / max per dynamic axis) derived from the manifest.

Every named dynamic axis of every graph input gets a range here; output-only axes are declared as
derived (``total = past + seq``). :func:`check_profiles` verifies that coverage against the manifest,
so a new dynamic axis added by the exporter fails CI until it has a profile.

Empty KV cache (``past = 0``). The ``llm`` graph takes the KV cache as inputs and the first prefill
has none. Two strategies, chosen by ``ProfileLimits.empty_past``:

* ``"bos_prefix"`` (default): every conversation starts with the BOS token at position 0, whose keys,
  values and hidden state are the same for every conversation. The builder computes them once with
  onnxruntime from the ONNX ``llm`` graph (``llm_bos_prefix.npz`` next to the engines); the TensorRT
  backend starts each KV cache holding that one token and feeds the rest of the first round.
  Exact (no dummy token, no mask), so every profile has ``past >= 1`` and no zero-sized dimension
  ever reaches TensorRT. The backend checks that the first row really is the BOS embedding.
* ``"empty_tensor"``: ``past`` min 0, relying on TensorRT's empty-tensor support for the concat of
  an empty past. Not verified in this project; use it only if the BOS check does not suit a model.

Other axes: ``seq`` (prefill length) 1..context, ``masks`` (referenced masks per mask-encoder call)
1..max_masks, ``n`` (``<seg>`` rows per seg-head / mask-decoder call) 1..max_seg, ``batch`` 1..max_batch.
Calls beyond a profile's max are split by the TensorRT backend (those graphs are row-independent and
a chunked prefill with the KV cache is exact), so the limits trade engine build/activation memory
against the number of calls, never correctness.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

EMPTY_PAST_STRATEGIES = ("bos_prefix", "empty_tensor")
DERIVED_AXES = {"total": ("past", "seq")}  # output-only axes: total = past + seq


@dataclass(frozen=True)
class AxisRange:
    min: int
    opt: int
    max: int

    def contains(self, v: int) -> bool:
        return self.min <= v <= self.max


@dataclass(frozen=True)
class Profile:
    name: str
    axes: dict  # axis name → AxisRange

    def contains(self, values: dict) -> bool:
        return all(self.axes[a].contains(v) for a, v in values.items() if a in self.axes)


@dataclass(frozen=True)
class ProfileLimits:
    max_context: int                 # tokens (manifest model.max_context)
    image_tokens: int = 256          # first-round prefill is ~image_tokens + prompt
    max_batch: int = 1               # the session runs batch 1
    max_masks: int = 16              # referenced masks CLIP-encoded in one call
    max_seg: int = 16                # <seg> rows decoded in one call (reuse=False decodes every round's)
    round_tokens: int = 64           # typical tokens of a later round (opt of the "round" profile)
    empty_past: str = "bos_prefix"

    @classmethod
    def from_manifest(cls, manifest, **overrides) -> "ProfileLimits":
        m = manifest.model
        kw = dict(max_context=int(m["max_context"]), image_tokens=int(m.get("image_tokens", 256)))
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


def _r(lo: int, opt: int, hi: int) -> AxisRange:
    opt = max(lo, min(opt, hi))
    return AxisRange(lo, opt, hi)


def axis_ranges(limits: ProfileLimits) -> dict[str, dict[str, AxisRange]]:
    """Per-profile-name ranges of every known axis (graphs take the axes they have)."""
    if limits.empty_past not in EMPTY_PAST_STRATEGIES:
        raise ValueError(f"empty_past must be one of {EMPTY_PAST_STRATEGIES}, got {limits.empty_past!r}")
    ctx = limits.max_context
    bos = limits.empty_past == "bos_prefix"
    past_min = 1 if bos else 0
    seq_max = ctx - 1 if bos else ctx        # with the BOS prefix one context slot is always in the past
    first = limits.image_tokens + limits.round_tokens
    common = {"batch": _r(1, 1, limits.max_batch), "masks": _r(1, 1, limits.max_masks), "n": _r(1, 1, limits.max_seg)}
    return {
        # the first round: the image's tokens + the prompt on top of an (almost) empty cache
        "prefill": {**common, "seq": _r(1, first, seq_max), "past": _r(past_min, past_min, ctx - 1)},
        # later rounds: a short prompt (+ mask tokens) on top of a long cache
        "round": {**common, "seq": _r(1, limits.round_tokens, seq_max),
                  "past": _r(past_min, first + 2 * limits.round_tokens, ctx - 1)},
    }


def _graph_axes(spec) -> list[str]:
    seen: list[str] = []
    for t in spec.inputs:
        for d in t.shape:
            if isinstance(d, str) and d not in seen:
                seen.append(d)
    return seen


def make_profiles(manifest, limits: ProfileLimits | None = None) -> dict[str, list[Profile]]:
    """Graph name → optimisation profiles (in TensorRT profile-index order). Graphs with only fixed
    input shapes get one profile with no axes (the builder adds none to TensorRT for them)."""
    limits = limits or ProfileLimits.from_manifest(manifest)
    ranges = axis_ranges(limits)
    out: dict[str, list[Profile]] = {}
    for name, spec in manifest.graphs.items():
        axes = _graph_axes(spec)
        # the llm gets both profiles (kernel choice differs a lot between 300-token and 30-token prefills);
        # other graphs have one
        kinds = ["prefill", "round"] if {"seq", "past"} <= set(axes) else ["prefill"]
        profs = []
        for k in kinds:
            profs.append(Profile(k if len(kinds) > 1 else "default",
                                 {a: ranges[k][a] for a in axes if a in ranges[k]}))
        out[name] = profs
    return out


def input_shapes(spec, profile: Profile) -> dict[str, tuple[tuple, tuple, tuple]]:
    """Input name → (min shape, opt shape, max shape) of one profile, for ``IOptimizationProfile.set_shape``."""
    out = {}
    for t in spec.inputs:
        dims = [[], [], []]
        for d in t.shape:
            r = profile.axes[d] if isinstance(d, str) else AxisRange(d, d, d)
            dims[0].append(r.min)
            dims[1].append(r.opt)
            dims[2].append(r.max)
        out[t.name] = tuple(tuple(x) for x in dims)
    return out


def check_profiles(manifest, profiles: dict[str, list[Profile]], limits: ProfileLimits | None = None) -> list[str]:
    """Problems with ``profiles`` against ``manifest`` (empty list = every dynamic axis is covered)."""
    problems: list[str] = []
    covered: set[str] = set()
    empty_ok = limits is not None and limits.empty_past == "empty_tensor"
    for name, spec in manifest.graphs.items():
        axes = _graph_axes(spec)
        profs = profiles.get(name)
        if not profs:
            problems.append(f"graph {name}: no optimisation profile")
            continue
        for p in profs:
            for a in axes:
                r = p.axes.get(a)
                if r is None:
                    problems.append(f"graph {name} profile {p.name}: dynamic axis {a!r} has no range")
                    continue
                if not (r.min <= r.opt <= r.max):
                    problems.append(f"graph {name} profile {p.name}: axis {a!r} has min/opt/max {r.min}/{r.opt}/{r.max}")
                floor = 0 if (a == "past" and empty_ok) else 1
                if r.min < floor:
                    problems.append(f"graph {name} profile {p.name}: axis {a!r} min {r.min} < {floor} "
                                    "(zero-sized dimensions need empty_past='empty_tensor')")
                covered.add(a)
            for a in p.axes:
                if a not in axes:
                    problems.append(f"graph {name} profile {p.name}: axis {a!r} is not an input axis of the graph")
            if {"seq", "past"} <= set(p.axes):
                ctx = int(manifest.model["max_context"])
                if p.axes["seq"].min + p.axes["past"].min > ctx:
                    problems.append(f"graph {name} profile {p.name}: seq.min + past.min exceeds the context {ctx}")
        out_axes = {d for t in spec.outputs for d in t.shape if isinstance(d, str)} - set(axes)
        for a in sorted(out_axes):
            src = DERIVED_AXES.get(a)
            if src is None:
                problems.append(f"graph {name}: output axis {a!r} is neither an input axis nor declared in DERIVED_AXES")
            elif not set(src) <= set(axes):
                problems.append(f"graph {name}: output axis {a!r} derives from {src}, not all inputs of the graph")
            else:
                covered.add(a)
    missing = manifest.axes() - covered
    for a in sorted(missing):
        problems.append(f"manifest axis {a!r} is covered by no profile")
    return problems


def profiles_to_json(profiles: dict[str, list[Profile]]) -> dict:
    return {g: [{"name": p.name, "axes": {a: asdict(r) for a, r in p.axes.items()}} for p in ps]
            for g, ps in profiles.items()}


def profiles_from_json(d: dict) -> dict[str, list[Profile]]:
    return {g: [Profile(p["name"], {a: AxisRange(**r) for a, r in p["axes"].items()}) for p in ps]
            for g, ps in d.items()}


def profile_hash(graph_profiles: list[Profile]) -> str:
    blob = json.dumps(profiles_to_json({"g": graph_profiles}), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def select_profile(profiles: list[Profile], values: dict) -> int | None:
    """Index of the first profile whose ranges contain ``values`` (axis → size), preferring the one whose
    opt is closest; None when none does (the caller splits the call)."""
    best, best_d = None, None
    for i, p in enumerate(profiles):
        if p.contains(values):
            d = sum(abs(values[a] - p.axes[a].opt) for a in values if a in p.axes)
            if best_d is None or d < best_d:
                best, best_d = i, d
    return best
