"""Tokenizer tests: the reference layout (docs/reference.md §5.2) on every MSR-VTT 1k-A caption, hand-checked ids."""

from __future__ import annotations

import csv
import html
from pathlib import Path

import ftfy
import pytest
import regex
import torch
from open_clip.tokenizer import SimpleTokenizer

from diffusionret import tokenizer as tok
from diffusionret.tokenizer import EOT_ID, SOT_ID, Tokenizer, decode, encode, tokenize

MSRVTT_TEST_CSV = Path(__file__).parent / "data" / "msrvtt" / "MSRVTT_JSFUSION_test.csv"
MAX_WORDS = (12, 32, 64)

# The CLIP word-split regex (OpenAI CLIP / the reference) without its special-token alternatives.
CLIP_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


@pytest.fixture(scope="module")
def captions() -> list[str]:
    with MSRVTT_TEST_CSV.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1000
    return [row["sentence"] for row in rows]


@pytest.fixture(scope="module")
def fresh_bpe() -> SimpleTokenizer:
    """A separate open_clip tokenizer, so expectations do not go through diffusionret's cached one."""
    return SimpleTokenizer()


@pytest.fixture(scope="module")
def bpe_ids(captions: list[str], fresh_bpe: SimpleTokenizer) -> list[list[int]]:
    return [fresh_bpe.encode(caption) for caption in captions]


def reference_clean(text: str) -> str:
    """The reference's cleaning (docs/reference.md §5.2): ftfy, HTML unescaped twice, whitespace collapsed, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def reference_bpe(text: str, bpe: SimpleTokenizer) -> list[int]:
    """Reference-style ids for texts without '<|startoftext|>'/'<|endoftext|>' literals.

    Each regex piece is BPE-encoded as its own word, so encoding the pieces one at a time with open_clip
    (whose cleaning leaves a cleaned, whitespace-free piece unchanged) is the reference's split + BPE.
    """
    return [i for piece in CLIP_SPLIT.findall(reference_clean(text)) for i in bpe.encode(piece)]


@pytest.mark.parametrize("max_words", MAX_WORDS)
def test_msrvtt_captions_follow_reference_layout(captions, bpe_ids, max_words):
    ids, mask = tokenize(captions, max_words=max_words)
    assert ids.shape == mask.shape == (1000, max_words)
    assert ids.dtype == mask.dtype == torch.long
    ids_rows, mask_rows = ids.tolist(), mask.tolist()
    truncated = 0
    for row, bpe in enumerate(bpe_ids):
        row_ids, row_mask = ids_rows[row], mask_rows[row]
        eot_pos = min(len(bpe) + 1, max_words - 1)
        truncated += len(bpe) > max_words - 2
        assert row_ids[0] == SOT_ID
        assert row_ids.count(EOT_ID) == 1
        assert row_ids[eot_pos] == EOT_ID
        assert row_mask == [1] * (eot_pos + 1) + [0] * (max_words - eot_pos - 1)
        assert all(i == 0 for i, m in zip(row_ids, row_mask) if m == 0)
        # Truncation keeps the first max_words - 2 BPE tokens.
        assert row_ids[1:eot_pos] == bpe[: max_words - 2]
        expected = [SOT_ID, *bpe[: max_words - 2], EOT_ID]
        assert row_ids == expected + [0] * (max_words - len(expected))
    # The longest caption has 31 BPE tokens: max_words=12 truncates many, 32 exactly one, 64 none.
    assert {12: truncated > 0, 32: truncated == 1, 64: truncated == 0}[max_words]


def test_open_clip_cleaning_matches_reference_on_msrvtt(captions, fresh_bpe):
    for caption in captions:
        assert encode(caption) == reference_bpe(caption, fresh_bpe), caption


@pytest.mark.parametrize(
    "text",
    [
        "  A\tMan\n\nIS  cooking  ",
        "a\x1cb\x1dc\x1e d\x1f",  # str.split() vs regex \s differ exactly on U+001C..U+001F; ftfy drops them
        "caf\u00e9 \u00a0na\u00efve\u2028line\u3000ideographic",
        "&amp;amp; &lt;b&gt; it's 12 o'clock",
        "Ã©mojis ðŸ˜€ and mojibake",
        "",
    ],
)
def test_open_clip_cleaning_matches_reference_on_edge_cases(text, fresh_bpe):
    assert encode(text) == reference_bpe(text, fresh_bpe)


def test_hand_checked_ids():
    ids, mask = tokenize("a man is cooking", max_words=8)
    assert ids.tolist() == [[SOT_ID, 320, 786, 533, 6283, EOT_ID, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1, 0, 0]]
    # Cleaning: whitespace collapse, double HTML unescape, lowercase; "!!" is one BPE piece.
    assert encode("A  Man\tIS &amp;amp; Cooking!!") == [320, 786, 533, 261, 6283, 748]
    assert encode("the dog's ball, 2024") == [518, 1929, 568, 1069, 267, 273, 271, 273, 275]
    assert (SOT_ID, EOT_ID, tok.VOCAB_SIZE) == (49406, 49407, 49408)


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text_gives_sot_eot(text):
    ids, mask = tokenize(text, max_words=5)
    assert ids.tolist() == [[SOT_ID, EOT_ID, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0, 0]]


def test_max_words_two_keeps_only_sot_eot():
    ids, mask = tokenize(["a man is cooking", ""], max_words=2)
    assert ids.tolist() == [[SOT_ID, EOT_ID]] * 2
    assert mask.tolist() == [[1, 1]] * 2


def test_exact_fit_is_not_truncated():
    ids, _ = tokenize("a man is cooking", max_words=6)  # 4 BPE tokens + SOT + EOT
    assert ids.tolist() == [[SOT_ID, 320, 786, 533, 6283, EOT_ID]]
    ids, _ = tokenize("a man is cooking", max_words=5)
    assert ids.tolist() == [[SOT_ID, 320, 786, 533, EOT_ID]]


def test_batched_equals_per_item(captions):
    texts = captions[:50] + ["", "x" * 300]
    ids, mask = tokenize(texts, max_words=16)
    for row, text in enumerate(texts):
        one_ids, one_mask = tokenize(text, max_words=16)
        assert torch.equal(ids[row : row + 1], one_ids)
        assert torch.equal(mask[row : row + 1], one_mask)
    assert torch.equal(tokenize(tuple(texts), 16)[0], ids)


def test_empty_batch():
    ids, mask = tokenize([], max_words=4)
    assert ids.shape == mask.shape == (0, 4)


def test_tokenizer_class_matches_function(captions):
    tokenizer = Tokenizer(max_words=20)
    for got, want in zip(tokenizer(captions[:20]), tokenize(captions[:20], max_words=20)):
        assert torch.equal(got, want)
    assert tokenizer.encode("a man is cooking") == [320, 786, 533, 6283]
    assert tokenizer.decode(tokenizer("a man is cooking")[0][0]) == "a man is cooking"
    assert repr(tokenizer) == "Tokenizer(max_words=20)"
    with pytest.raises(ValueError):
        Tokenizer(max_words=1)


@pytest.mark.parametrize("literal", ["<end_of_text>", "<START_OF_TEXT>", "<|endoftext|>", "<|startoftext|>"])
def test_special_token_literals_are_not_injected(literal):
    ids, mask = tokenize(f"a man {literal} is cooking", max_words=32)
    body = ids[0, 1 : int(mask.sum()) - 1]
    assert SOT_ID not in body.tolist() and EOT_ID not in body.tolist()
    assert (ids == EOT_ID).sum() == 1
    # Each regex piece is an independent BPE word, so spacing the pieces out gives the ordinary encoding.
    spaced = " ".join(CLIP_SPLIT.findall(literal.lower()))
    assert encode(f"a man {literal} is cooking") == encode(f"a man {spaced} is cooking")


def test_reference_recognised_literals_differ_only_there(fresh_bpe):
    """Documented deviation: the reference maps '<|endoftext|>' text to id 49407; we never emit it."""
    assert fresh_bpe.encode("<end_of_text>") == [EOT_ID]  # open_clip's own literal is special...
    assert encode("<end_of_text>") == [283, 806, 318, 539, 318, 4160, 285]  # ...but not through diffusionret
    assert encode("<|endoftext|>") == [27, 347, 40786, 4160, 91, 285]


def test_decode_round_trip_and_padding():
    ids, mask = tokenize(["a man is cooking", "hello world!"], max_words=10)
    assert decode(ids) == ["a man is cooking", "hello world !"]
    assert decode(ids[1]) == "hello world !"
    assert decode(ids, mask) == ["a man is cooking", "hello world !"]
    assert decode(ids[0].tolist()) == "a man is cooking"
    # Without a mask, a row ends at EOT: the padding zeros (id 0 is "!") are not decoded.
    assert decode([SOT_ID, 320, EOT_ID, 0, 0]) == "a"
    assert decode([SOT_ID, 320, 0, 0], mask=[1, 1, 0, 0]) == "a"
    with pytest.raises(ValueError):
        decode(torch.zeros(2, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError):
        decode([1, 2], mask=[1])
    with pytest.raises(ValueError):
        decode([49408])


@pytest.mark.parametrize("max_words", [1, 0, -3])
def test_rejects_small_max_words(max_words):
    with pytest.raises(ValueError, match="max_words"):
        tokenize("a", max_words=max_words)


@pytest.mark.parametrize("max_words", [True, 2.0, "32", None])
def test_rejects_non_int_max_words(max_words):
    with pytest.raises(TypeError, match="max_words"):
        tokenize("a", max_words=max_words)


@pytest.mark.parametrize("texts", [None, 3, b"bytes", ["ok", 1], ["ok", None], [b"x"]])
def test_rejects_non_string_texts(texts):
    with pytest.raises(TypeError):
        tokenize(texts)


def test_encode_rejects_non_string():
    with pytest.raises(TypeError):
        encode(123)  # type: ignore[arg-type]


def test_bpe_is_built_once():
    assert tok._clip_bpe() is tok._clip_bpe()
