"""Compact tokenizer for the Countdown search-trace language (SoS+ and APR).

The vocabulary is a fixed list in this file, so ids never change by accident; bump
``VOCAB_VERSION`` whenever it changes. Layout (ids in order):

* ``0`` ``<pad>``, ``1`` ``<bos>``, ``2`` ``<eos>``;
* the digits ``0``-``9`` (contiguous: digit ``d`` is ``digit_ids[0] + d``), one token per
  digit (numbers are never merged);
* single characters: space, newline and ASCII punctuation / operators;
* 256 byte tokens ``<0x00>`` .. ``<0xFF>`` (the fallback);
* the fixed phrases of the trace language (``docs/trace_format.md``), e.g.
  ``"Exploring Operation: "``. New phrases are appended at the end, so earlier ids stay.

Encoding is one compiled regex alternation (phrases longest first, then the single
characters, then any other character) plus a dict lookup per match. A character that is not
in the vocabulary is written as the bytes of its UTF-8 encoding with ``surrogatepass``, so
EVERY Python ``str`` round-trips exactly, lone surrogates included:
``decode(encode(s)) == s``. Byte tokens whose value also has its own character token
(digits, punctuation, space, newline) are never produced by ``encode`` but decode fine.
``decode`` never raises on in-range ids: byte sequences that are not valid UTF-8 (only
possible for ids that did not come from ``encode``) become U+FFFD.
"""

from __future__ import annotations

import codecs
import itertools
import re
from collections.abc import Sequence

import numpy as np

VOCAB_VERSION = 1

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
DIGITS = tuple("0123456789")
# Single characters besides digits: space, newline, tab and all ASCII punctuation.
CHARS = (" ", "\n", "\t") + tuple("+-*/=,:[]'#<>().!\"$%&;?@\\^_`{|}~")
NUM_BYTES = 256
# Fixed phrases of the language, exact spacing included. Append only (ids are positions).
PHRASES = (
    # SoS / SoS+ lines
    "Current State: ",
    ", Operations: ",
    "Exploring Operation: ",
    ", Resulting Numbers: ",
    "Generated Node #",
    " Operation: ",
    "Moving to Node #",
    " equal: Goal Reached",
    " unequal: No Solution",
    "No solution found.",
    "Start Sub Search at level ",
    "Exit Sub Search at level ",
    "No solution found in sub search",
    # APR spawn / join blocks
    "<Calling Sub Searches>",
    "<End Calling Sub Searches>",
    "<Start Sub Search ",
    " at level ",
    "<Sub Searches>",
    "<End Sub Searches>",
    "<No Solution in Sub Search ",
    "<Goal Reached in Sub Search ",
    " at Node #",
    # conditioning prefixes
    "Sub Call Budget: ",
    "Token Budget: ",
    # list punctuation: "[22, 31, 27]", "27:[...]", "['53-26=27', '31-22=9']", "[]"
    ", ",
    ": ",
    ":[",
    "[]",
    "['",
    "', '",
    "']",
)

_ERRORS = "jaxapr.tokenizer.surrogatepass_or_replace"


def _surrogatepass_or_replace(exc: UnicodeError):
    """UTF-8 decode error handler: restore encoded surrogates, replace other bad bytes."""
    try:
        return codecs.lookup_error("surrogatepass")(exc)
    except UnicodeError:
        return "\ufffd", exc.start + 1


codecs.register_error(_ERRORS, _surrogatepass_or_replace)


class CountdownTokenizer:
    """Compact vocabulary for Countdown traces with an exact round trip for any ``str``.

    Attributes: ``vocab`` (token strings; bytes shown as ``<0xAB>``), ``vocab_size``,
    ``pad_id`` (0), ``bos_id``, ``eos_id``, ``digit_ids`` (int32[10], digit order),
    ``storage_dtype`` (smallest unsigned numpy dtype holding every id: uint16).
    """

    def __init__(self) -> None:
        self.vocab: list[str] = (
            list(SPECIAL_TOKENS)
            + list(DIGITS)
            + list(CHARS)
            + [f"<0x{b:02X}>" for b in range(NUM_BYTES)]
            + list(PHRASES)
        )
        self.vocab_size: int = len(self.vocab)
        assert self.vocab_size < 2**16
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.special_ids = frozenset((self.pad_id, self.bos_id, self.eos_id))
        self.digit_ids = np.arange(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + 10, dtype=np.int32)
        self.byte_offset = len(SPECIAL_TOKENS) + len(DIGITS) + len(CHARS)
        self.storage_dtype = np.min_scalar_type(self.vocab_size - 1)

        texts = list(DIGITS) + list(CHARS) + list(PHRASES)
        ids = [i for i in range(self.vocab_size) if not self._is_special_or_byte(i)]
        self._text_to_id: dict[str, int] = dict(zip(texts, ids))
        assert len(self._text_to_id) == len(texts), "duplicate token text"
        phrases = sorted(PHRASES, key=len, reverse=True)
        singles = "".join(DIGITS + CHARS)
        self._pattern = re.compile("|".join(map(re.escape, phrases)) + f"|[{re.escape(singles)}]|.", re.DOTALL)
        # id -> UTF-8 bytes (specials render as their names when skip_special=False).
        id_bytes = [t.encode("utf-8") for t in self.vocab]
        for b in range(NUM_BYTES):
            id_bytes[self.byte_offset + b] = bytes([b])
        self._id_bytes = np.empty(self.vocab_size, dtype=object)
        self._id_bytes[:] = id_bytes

    def _is_special_or_byte(self, i: int) -> bool:
        return i < len(SPECIAL_TOKENS) or self.byte_offset <= i < self.byte_offset + NUM_BYTES

    def __len__(self) -> int:
        return self.vocab_size

    # ----------------------------------------------------------------------------- lookup
    def token_str(self, token_id: int) -> str:
        """The vocabulary string of one id (for debugging)."""
        self._check_ids(np.asarray([token_id]))
        return self.vocab[int(token_id)]

    def token_id(self, text: str) -> int:
        """The id of a vocabulary string (a digit, character, phrase or special name)."""
        if text in SPECIAL_TOKENS:
            return SPECIAL_TOKENS.index(text)
        if text not in self._text_to_id:
            raise ValueError(f"{text!r} is not a single token of CountdownTokenizer (VOCAB_VERSION {VOCAB_VERSION})")
        return self._text_to_id[text]

    # ----------------------------------------------------------------------------- encode
    def _encode_list(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        pieces = self._pattern.findall(text)
        lookup = self._text_to_id
        try:
            return [lookup[p] for p in pieces]
        except KeyError:  # some characters need the byte fallback
            out: list[int] = []
            for p in pieces:
                i = lookup.get(p)
                if i is None:
                    out.extend(self.byte_offset + b for b in p.encode("utf-8", "surrogatepass"))
                else:
                    out.append(i)
            return out

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
        """Token ids (int32[n]) of ``text``; ``decode`` inverts it exactly."""
        ids = self._encode_list(text)
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return np.asarray(ids, dtype=np.int32)

    def encode_batch(
        self,
        texts: Sequence[str],
        max_len: int | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        dtype=np.int32,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode many texts: (ids [B, L] right-padded with ``pad_id``, lengths int32[B]).

        ``L`` is ``max_len`` if given (a longer text raises ValueError), else the longest.
        """
        dtype = np.dtype(dtype)
        if dtype.kind not in "iu" or np.iinfo(dtype).max < self.vocab_size - 1:
            raise ValueError(f"dtype {dtype} cannot hold token ids up to {self.vocab_size - 1}")
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a sequence of str, got a single str")
        rows = [self._encode_list(t) for t in texts]
        extra = int(add_bos) + int(add_eos)
        lengths = np.fromiter((len(r) + extra for r in rows), dtype=np.int32, count=len(rows))
        width = int(lengths.max(initial=0))
        if max_len is not None:
            if width > max_len:
                i = int(np.argmax(lengths > max_len))
                raise ValueError(f"text {i} has {int(lengths[i])} tokens, more than max_len={max_len}")
            width = int(max_len)
        out = np.full((len(rows), width), self.pad_id, dtype=dtype)
        body = np.fromiter(
            itertools.chain.from_iterable(rows), dtype=dtype, count=int(lengths.sum()) - extra * len(rows)
        )
        start = int(add_bos)
        cols = np.arange(width)
        mask = (cols >= start) & (cols < (lengths - int(add_eos))[:, None])
        out[mask] = body
        if add_bos:
            out[:, 0] = self.bos_id
        if add_eos:
            out[np.arange(len(rows)), lengths - 1] = self.eos_id
        return out, lengths

    # ----------------------------------------------------------------------------- decode
    def _check_ids(self, ids: np.ndarray) -> None:
        if ids.size and ids.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            raise ValueError(f"token id {int(ids[bad][0])} is out of range [0, {self.vocab_size})")

    def decode(self, ids, skip_special: bool = True) -> str:
        """Text of a 1-D id sequence. pad/bos/eos are dropped unless ``skip_special=False``
        (then rendered as ``<pad>``, ``<bos>``, ``<eos>``)."""
        ids = np.asarray(ids)
        if ids.ndim > 1:
            raise ValueError(f"decode expects a 1-D id sequence, got shape {ids.shape}; use decode_batch")
        ids = ids.reshape(-1)
        if ids.size == 0:
            return ""
        self._check_ids(ids)
        ids = ids.astype(np.int64, copy=False)
        if skip_special:
            ids = ids[ids >= len(SPECIAL_TOKENS)]
        return b"".join(self._id_bytes[ids]).decode("utf-8", _ERRORS)

    def decode_batch(self, ids, lengths=None, skip_special: bool = True) -> list[str]:
        """Decode rows ``ids[b, :lengths[b]]`` (whole rows if ``lengths`` is None)."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"decode_batch expects ids of shape [B, L], got {ids.shape}")
        if lengths is None:
            lengths = np.full(ids.shape[0], ids.shape[1])
        lengths = np.asarray(lengths).reshape(-1)
        if lengths.shape[0] != ids.shape[0] or (lengths < 0).any() or (lengths > ids.shape[1]).any():
            raise ValueError(
                f"lengths must be {ids.shape[0]} values in [0, {ids.shape[1]}], got {lengths.tolist()[:8]}"
            )
        return [self.decode(row[:n], skip_special) for row, n in zip(ids, lengths.tolist())]
