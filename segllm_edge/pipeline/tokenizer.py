"""Tokenizer and the Vicuna-v1 conversation template of the released SegLLM (``tokenizers`` on the
folder's tokenizer.json; transformers only for a checkpoint that has nothing but tokenizer.model).

The research code re-tokenizes the whole conversation every round. Text is split at
special tokens before tokenization, and every round ends with ``</s>``, so a round's
tokens can be computed alone: tokenize ``"</s>" + round_text`` and drop the leading
``</s>``. :meth:`SegLLMTokenizer.round_ids` does that; tests check it against
whole-conversation tokenization.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, RoundReferenceError

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
USER, ASSISTANT = "USER", "ASSISTANT"
VIDEO, SEG, EOS = "<video>", "<seg>", "</s>"
DEFAULT_MAX_LENGTH = 2048
REF_SUFFIX = re.compile(r"\[REF:\s*([0-9][0-9,\s]*)\]\s*$", re.IGNORECASE)
REF_ANY = re.compile(r"\[\s*REF\s*:([^\]]*)\]", re.IGNORECASE)   # every [REF:...], well-formed or not
RESERVED_TOKENS = ("<video>", "<seg>", "</s>", "<s>", "<unk>", "<image>", "<seg_input>")


def split_refs(question: str) -> tuple[str, list[int]]:
    """``"Segment it.[REF:1,2]"`` → ``("Segment it.", [1, 2])``; questions without a suffix pass through.

    References go at the end (one or more ``[REF:...]`` groups, merged in order); a ``[REF:...]``
    anywhere else, or one that is not a list of round numbers (``[REF:-1]``, ``[REF:abc]``), raises
    :class:`RoundReferenceError` instead of being sent to the model as text.
    """
    found = list(REF_ANY.finditer(question))
    if not found:
        return question, []
    end = len(question.rstrip())
    tail: list[re.Match] = []
    for m in reversed(found):                    # the run of groups that ends the question
        if question[m.end():end].strip():
            break
        tail.insert(0, m)
        end = m.start()
    if len(tail) < len(found):
        stray = found[len(found) - len(tail) - 1].group(0)
        raise RoundReferenceError(f"{stray} is in the middle of the question; references go at its end, "
                                  "e.g. 'Segment the bag she holds.[REF:1]'")
    refs: list[int] = []
    for m in tail:
        items = [x for x in re.split(r"[,\s]+", m.group(1).strip()) if x]
        bad = [x for x in items if not re.fullmatch(r"[0-9]+", x)]
        if bad or not items:
            raise RoundReferenceError(f"{m.group(0)} is not a list of round numbers (1, 2, ...): "
                                      f"{', '.join(bad) if bad else 'it is empty'}")
        refs += [int(x) for x in items]
    return question[: tail[0].start()].rstrip(), refs


def round_text(question: str, n_image_tokens: int, n_refs: int, first: bool) -> str:
    """The text of one round (user turn + teacher-forced ``<seg>`` answer), as the research code builds it.

    Round 1: ``USER: <video>×256 {q} ASSISTANT: <seg></s>`` after the system prompt;
    later rounds: ``USER: (<video><video>)×refs{q} ASSISTANT: <seg></s>``.
    """
    if first:
        user = VIDEO * n_image_tokens + " " + question
        prefix = SYSTEM + " "
    else:
        user = VIDEO * (2 * n_refs) + question
        prefix = ""
    return f"{prefix}{USER}: {user} {ASSISTANT}: {SEG}{EOS}"


class _FastTokenizer:
    """The ``tokenizers`` library on a folder's ``tokenizer.json`` (no transformers): the subset of a
    transformers tokenizer this module calls, giving the same ids (tests compare the two)."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        self.tk = Tokenizer.from_file(str(folder / "tokenizer.json"))
        cfg_file = folder / "tokenizer_config.json"
        self.config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        self.added_tokens_decoder = {i: t.content for i, t in self.tk.get_added_tokens_decoder().items()}
        unk = self.config.get("unk_token", "<unk>")
        self.unk_token_id = self.tk.token_to_id(unk if isinstance(unk, str) else unk.get("content", "<unk>"))
        bos = self.config.get("bos_token", "<s>")
        self.bos_token_id = self.tk.token_to_id(bos if isinstance(bos, str) else bos.get("content", "<s>"))
        self.model_max_length = self.config.get("model_max_length", DEFAULT_MAX_LENGTH)

    def convert_tokens_to_ids(self, token: str):
        return self.tk.token_to_id(token)

    def __len__(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids


def _load(folder: Path):
    if (folder / "tokenizer.json").is_file():
        return _FastTokenizer(folder)
    try:  # a checkpoint with only the sentencepiece model: transformers converts it
        from transformers import AutoTokenizer
    except ImportError:
        raise CheckpointError(f"{folder} has no tokenizer.json; reading its tokenizer.model needs transformers "
                              "(pip install 'segllm-edge[export]')") from None
    return _TransformersTokenizer(AutoTokenizer.from_pretrained(str(folder), local_files_only=True))


class _TransformersTokenizer:
    def __init__(self, tok):
        self.tok = tok
        self.added_tokens_decoder = {i: getattr(v, "content", str(v))
                                     for i, v in getattr(tok, "added_tokens_decoder", {}).items()}
        self.unk_token_id = tok.unk_token_id
        self.bos_token_id = tok.bos_token_id
        self.model_max_length = getattr(tok, "model_max_length", DEFAULT_MAX_LENGTH)

    def convert_tokens_to_ids(self, token: str):
        return self.tok.convert_tokens_to_ids(token)

    def __len__(self) -> int:
        return len(self.tok)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tok(text, add_special_tokens=add_special_tokens).input_ids)


@dataclass
class SegLLMTokenizer:
    tok: object  # _FastTokenizer (tokenizer.json through `tokenizers`) or _TransformersTokenizer
    video_id: int
    seg_id: int
    eos_id: int
    bos_id: int
    max_length: int

    @classmethod
    def from_folder(cls, folder: str | Path) -> "SegLLMTokenizer":
        folder = Path(folder)
        if not folder.is_dir() or not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            raise CheckpointError(f"no tokenizer in {folder}: expected tokenizer.json or tokenizer.model there "
                                  "(an export keeps it in its tokenizer/ folder; re-export if it is missing)")
        try:
            tok = _load(Path(folder))
        except CheckpointError:
            raise
        except Exception as exc:  # tokenizers/transformers raise many types for broken tokenizer files
            raise CheckpointError(f"cannot load the tokenizer from {folder}: {exc}") from None
        ids = {}
        for t in (VIDEO, SEG, EOS):
            i = tok.convert_tokens_to_ids(t)
            if i is None or i == tok.unk_token_id:
                raise CheckpointError(f"the tokenizer in {folder} has no {t} token: not a SegLLM tokenizer")
            ids[t] = int(i)
        if tok.bos_token_id is None:
            raise CheckpointError(f"the tokenizer in {folder} has no BOS token")
        max_len = tok.model_max_length
        if not isinstance(max_len, int) or max_len > 1_000_000:
            max_len = DEFAULT_MAX_LENGTH
        return cls(tok=tok, video_id=ids[VIDEO], seg_id=ids[SEG], eos_id=ids[EOS], bos_id=int(tok.bos_token_id),
                   max_length=max_len)

    def reserved_tokens(self) -> tuple[str, ...]:
        """Special/added tokens a question must not contain (they would shift placeholders or ``<seg>``)."""
        return tuple(sorted(set(RESERVED_TOKENS).union(self.tok.added_tokens_decoder.values())))

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` alone (no special tokens); used for the question-length limit."""
        return len(self.tok.encode(text, add_special_tokens=False))

    def conversation_ids(self, text: str) -> list[int]:
        """Whole-conversation tokenization (BOS added), as the research code does each round."""
        return list(self.tok.encode(text))

    def round_ids(self, text: str, first: bool) -> list[int]:
        """Token ids of one round alone; concatenating rounds equals :meth:`conversation_ids` of the whole."""
        if first:
            return self.conversation_ids(text)
        ids = list(self.tok.encode(EOS + text, add_special_tokens=False))
        if not ids or ids[0] != self.eos_id:
            raise RuntimeError("internal: round tokenization did not start at </s>")
        return ids[1:]
