"""CLIP BPE tokenisation with the reference's truncation and padding (docs/reference.md §5.2).

The byte-level BPE itself comes from ``open_clip.tokenizer.SimpleTokenizer`` (the same
``bpe_simple_vocab_16e6`` merges and vocabulary as OpenAI CLIP); this module only adds the layout the
DiffusionRet data loaders produce::

    words = [SOT] + bpe(text)            # SOT = 49406
    words = words[: max_words - 1]       # truncate, keeping room for EOT
    words = words + [EOT]                # EOT = 49407, so EOT is always present
    ids, mask = words, ones              # then both zero-padded to max_words

EOT therefore sits at position ``min(len(bpe) + 1, max_words - 1)``.

Text cleaning, compared with the reference's own copy of the CLIP tokenizer (both apply, in this
order: ``ftfy.fix_text``, ``html.unescape`` twice, strip, whitespace collapse, lowercase, then the CLIP
regex split and BPE):

* Whitespace collapse: the reference collapses ``regex`` ``\\s+``, open_clip splits with ``str.split()``.
  The two disagree only on U+001C..U+001F, which ``ftfy.fix_text`` removes beforehand, so the cleaned
  text is identical (``tests/test_tokenizer.py`` checks this on every MSR-VTT test caption).
* Special-token literals: the reference's regex turns the literal text ``<|startoftext|>`` /
  ``<|endoftext|>`` into the special ids, open_clip's turns ``<start_of_text>`` / ``<end_of_text>`` into
  them. Neither is wanted for user text (an injected EOT would move the position CLIP reads its text
  feature from), so :func:`encode` never emits a special id: open_clip's literals are encoded as the
  ordinary BPE pieces the reference gives them, and the reference's literals as open_clip gives them.
  This deviates from the reference only for captions containing ``<|startoftext|>`` or
  ``<|endoftext|>``, which no benchmark caption does.
* ``ftfy`` normalisation depends on the installed ``ftfy`` version in both implementations.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from diffusionret.inputs import REFERENCE_INPUT

if TYPE_CHECKING:
    from open_clip.tokenizer import SimpleTokenizer

logger = logging.getLogger(__name__)

__all__ = ["SOT_ID", "EOT_ID", "VOCAB_SIZE", "Tokenizer", "tokenize", "encode", "decode"]

SOT_ID = 49406  # <|startoftext|> in OpenAI CLIP's vocabulary
EOT_ID = 49407  # <|endoftext|>; the highest id, which CLIP's text tower relies on (argmax pooling)
VOCAB_SIZE = 49408

# Text whose CLIP regex split yields the same pieces as open_clip's special-token literals when they are
# *not* treated as special: each regex match is BPE-encoded as its own word, so spaces between the pieces
# do not change the ids.
_SPECIAL_LITERAL_PIECES = {SOT_ID: "< start _ of _ text >", EOT_ID: "< end _ of _ text >"}

# Words whose BPE merges are remembered. open_clip's own cache keeps every word ever seen, so a
# service answering arbitrary queries would grow by every distinct word; a few thousand entries
# already cover the common vocabulary of captions and queries.
BPE_CACHE_ENTRIES = 4096


class _NoStore(dict):
    """A dict that ignores writes: open_clip's ``cache``, emptied of all but its special tokens."""

    def __setitem__(self, key: str, value: str) -> None:
        pass


class BoundedBpe:
    """``SimpleTokenizer.bpe`` with a least-recently-used cache of at most ``max_entries`` words.

    Thread-safe: ``serve`` tokenises on several worker threads.
    """

    def __init__(self, bpe: Callable[[str], str], max_entries: int = BPE_CACHE_ENTRIES) -> None:
        if max_entries <= 0:
            raise ValueError(f"max_entries must be positive, got {max_entries}")
        self._bpe = bpe
        self._max_entries = max_entries
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, token: str) -> str:
        with self._lock:
            word = self._cache.get(token)
            if word is not None:
                self._cache.move_to_end(token)
                return word
        word = self._bpe(token)  # outside the lock: merging is the slow part
        with self._lock:
            self._cache[token] = word
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)
        return word

    def __len__(self) -> int:
        return len(self._cache)


@functools.lru_cache(maxsize=1)
def _clip_bpe() -> SimpleTokenizer:
    """The shared open_clip tokenizer (loading the merges takes ~0.3 s, so it is built once)."""
    # Imported here: importing open_clip pulls in its whole model zoo, which `import diffusionret.tokenizer`
    # should not pay for until text is actually tokenised.
    from open_clip.tokenizer import SimpleTokenizer

    try:
        # "lower" = ftfy + html unescape + whitespace collapse + lowercase, the CLIP/reference cleaning.
        tokenizer = SimpleTokenizer(clean="lower")
    except TypeError:  # open_clip < 2.23 has no `clean` argument; its only behaviour is "lower"
        tokenizer = SimpleTokenizer()
    if (tokenizer.sot_token_id, tokenizer.eot_token_id, tokenizer.vocab_size) != (SOT_ID, EOT_ID, VOCAB_SIZE):
        raise RuntimeError(
            "open_clip's SimpleTokenizer does not use the OpenAI CLIP vocabulary: "
            f"sot={tokenizer.sot_token_id}, eot={tokenizer.eot_token_id}, vocab={tokenizer.vocab_size}"
        )
    # `encode` calls `self.bpe(word)`: an instance attribute takes the place of the method, and the
    # original method, which reads and writes `self.cache`, then finds only the special tokens there.
    original = tokenizer.bpe
    tokenizer.cache = _NoStore(tokenizer.cache)
    tokenizer.bpe = BoundedBpe(original)  # type: ignore[method-assign]
    return tokenizer


def bpe_cache_entries() -> int:
    """Words currently remembered by the shared tokenizer (bounded by :data:`BPE_CACHE_ENTRIES`)."""
    tokenizer = _clip_bpe()
    return len(tokenizer.cache) + len(tokenizer.bpe)


@functools.lru_cache(maxsize=1)
def _special_literal_ids() -> dict[int, tuple[int, ...]]:
    """Ordinary BPE ids for the text of each special-token literal open_clip would recognise."""
    bpe = _clip_bpe()
    return {special: tuple(bpe.encode(text)) for special, text in _SPECIAL_LITERAL_PIECES.items()}


def encode(text: str) -> list[int]:
    """BPE ids of one text, without SOT/EOT; never contains a special id.

    Args:
        text: raw caption or query; cleaned as described in the module docstring.

    Returns:
        The byte-level BPE ids, in ``[0, SOT_ID)``.

    Raises:
        TypeError: if ``text`` is not a ``str``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    ids = _clip_bpe().encode(text)
    if SOT_ID in ids or EOT_ID in ids:
        literal = _special_literal_ids()
        ids = [piece for i in ids for piece in (literal[i] if i in literal else (i,))]
    return ids


def _check_texts(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] must be a str, got {type(text).__name__}")
    return list(texts)


def _check_max_words(max_words: int) -> int:
    # bool is an int subclass; True would silently mean max_words=1.
    if isinstance(max_words, bool) or not isinstance(max_words, int):
        raise TypeError(f"max_words must be an int, got {type(max_words).__name__}")
    if max_words < 2:
        raise ValueError(f"max_words must be >= 2 (room for SOT and EOT), got {max_words}")
    return max_words


def tokenize(texts: str | Sequence[str], max_words: int = REFERENCE_INPUT.max_words) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask in the reference's layout (docs/reference.md §5.2).

    Args:
        texts: one text or a sequence of ``N`` texts (a single ``str`` gives ``N = 1``).
        max_words: ``L``, the padded length; includes SOT and EOT, so at most ``L - 2`` BPE tokens are kept.

    Returns:
        ``(ids, mask)``, both int64 of shape ``(N, L)``: ``ids[:, 0] == SOT_ID``, one ``EOT_ID`` per row at
        ``min(len(bpe) + 1, L - 1)``, zeros after it; ``mask`` is 1 up to and including EOT, else 0.

    Raises:
        TypeError: if ``texts`` is not a str/sequence of str, or ``max_words`` is not an int.
        ValueError: if ``max_words < 2``.
    """
    max_words = _check_max_words(max_words)
    texts = _check_texts(texts)
    ids = torch.zeros(len(texts), max_words, dtype=torch.long)
    mask = torch.zeros(len(texts), max_words, dtype=torch.long)
    for row, text in enumerate(texts):
        words = [SOT_ID, *encode(text)][: max_words - 1] + [EOT_ID]
        ids[row, : len(words)] = torch.tensor(words, dtype=torch.long)
        mask[row, : len(words)] = 1
    return ids, mask


def decode(ids: Sequence[int] | torch.Tensor, mask: Sequence[int] | torch.Tensor | None = None) -> str | list[str]:
    """Text of tokenised ids, for debugging (BPE decoding is lossy: cleaning is not undone).

    Padding cannot be told from id 0 (``"!"``) by value, so the row ends at its first EOT, or where
    ``mask`` is 0 when a mask is given. SOT/EOT are dropped.

    Args:
        ids: ``(L,)`` ids or ``(N, L)`` ids (a tensor or nested sequences).
        mask: optional mask of the same shape as ``ids``.

    Returns:
        One string for ``(L,)`` input, a list of ``N`` strings for ``(N, L)`` input.

    Raises:
        ValueError: if ``ids`` is not 1-D/2-D, ``mask`` has another shape, or an id is out of vocabulary.
    """
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    if ids_t.dim() not in (1, 2):
        raise ValueError(f"ids must be (L,) or (N, L), got shape {tuple(ids_t.shape)}")
    mask_t = torch.ones_like(ids_t) if mask is None else torch.as_tensor(mask)
    if mask_t.shape != ids_t.shape:
        raise ValueError(f"mask shape {tuple(mask_t.shape)} != ids shape {tuple(ids_t.shape)}")
    if ids_t.numel() and (int(ids_t.min()) < 0 or int(ids_t.max()) >= VOCAB_SIZE):
        raise ValueError(f"ids must lie in [0, {VOCAB_SIZE})")
    rows = [
        _decode_row(row.tolist(), row_mask.tolist())
        for row, row_mask in zip(ids_t.reshape(-1, ids_t.shape[-1]), mask_t.reshape(-1, ids_t.shape[-1]))
    ]
    return rows[0] if ids_t.dim() == 1 else rows


def _decode_row(row: list[int], row_mask: list[int]) -> str:
    kept = []
    for token, keep in zip(row, row_mask):
        if not keep or token == EOT_ID:
            break
        if token != SOT_ID:
            kept.append(token)
    return _clip_bpe().decode(kept).strip()


class Tokenizer:
    """Callable tokenizer with a fixed ``max_words``, for datasets and services.

    Example:
        >>> ids, mask = Tokenizer(max_words=32)(["a man is cooking"])  # (1, 32) each
    """

    def __init__(self, max_words: int = REFERENCE_INPUT.max_words) -> None:
        self.max_words = _check_max_words(max_words)

    def __call__(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids (N, max_words), mask (N, max_words))``; see :func:`tokenize`."""
        return tokenize(texts, self.max_words)

    def encode(self, text: str) -> list[int]:
        """BPE ids without SOT/EOT; see :func:`encode`."""
        return encode(text)

    def decode(
        self, ids: Sequence[int] | torch.Tensor, mask: Sequence[int] | torch.Tensor | None = None
    ) -> str | list[str]:
        """See :func:`decode`."""
        return decode(ids, mask)

    def __repr__(self) -> str:
        return f"Tokenizer(max_words={self.max_words})"
