"""Prompt construction and tokenization match the research code's ids."""
import pytest

from segllm_edge.pipeline.tokenizer import SegLLMTokenizer, round_text
from segllm_edge.pipeline.tokenizer import split_refs


@pytest.fixture(scope="module")
def tok(golden_ckpt):
    return SegLLMTokenizer.from_folder(golden_ckpt)


def _texts():
    return [round_text("Segment the red circle.", 256, 0, True),
            round_text("Segment the blue square next to it.", 256, 1, False),
            round_text("Segment the object above instance 2.", 256, 1, False)]


def test_token_ids_come_from_the_tokenizer(tok):
    assert (tok.video_id, tok.seg_id, tok.eos_id, tok.bos_id) == (1006, 1009, 2, 1)
    assert tok.max_length == 2048


@pytest.mark.parametrize("n", [1, 2, 3])
def test_whole_conversation_ids_match_golden(tok, golden_rounds, n):
    ids = tok.conversation_ids("".join(_texts()[:n]))
    assert ids == golden_rounds[n]["input_ids"].tolist()


def test_per_round_ids_concatenate_to_the_whole(tok, golden_rounds):
    ids = []
    for i, t in enumerate(_texts()):
        ids += tok.round_ids(t, first=i == 0)
    assert ids == golden_rounds[3]["input_ids"].tolist()


def test_placeholder_and_seg_positions(tok, golden_rounds):
    ids = golden_rounds[3]["input_ids"]
    assert (ids == tok.video_id).nonzero()[0].tolist() == golden_rounds[3]["video_token_positions"].tolist()
    assert (ids == tok.seg_id).nonzero()[0].tolist() == golden_rounds[3]["seg_token_positions"].tolist()


def test_multi_ref_round_has_two_placeholders_per_ref(tok):
    ids = tok.round_ids(round_text("Segment both.", 256, 3, False), first=False)
    assert ids.count(tok.video_id) == 6 and ids.count(tok.seg_id) == 1 and ids[-1] == tok.eos_id


@pytest.mark.parametrize("q,expected", [
    ("Segment it.[REF:1]", ("Segment it.", [1])),
    ("Segment it. [REF: 1, 3]", ("Segment it.", [1, 3])),
    ("Segment it.", ("Segment it.", [])),
    ("Segment it.[REF:1][REF:2] ", ("Segment it.", [1, 2])),
])
def test_split_refs(q, expected):
    assert split_refs(q) == expected


@pytest.mark.parametrize("q,match", [
    ("a [REF:2] in the middle", "in the middle of the question"),
    ("Segment it.[REF:-1]", "not a list of round numbers"),
    ("Segment it.[REF:abc]", "not a list of round numbers"),
    ("Segment it.[ref:]", "it is empty"),
])
def test_split_refs_refuses_malformed_references(q, match):
    from segllm_edge.errors import RoundReferenceError

    with pytest.raises(RoundReferenceError, match=match):
        split_refs(q)
