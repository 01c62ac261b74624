"""Tests for jaxapr.tokenizer: exact round trip, phrase/digit tokens, batching, errors."""

import gzip
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxapr import tokenizer as tk
from jaxapr.tokenizer import CountdownTokenizer

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "apr_reference_traces.jsonl.gz")
TOK = CountdownTokenizer()


def _calls(tree):
    """Every call string of an APR tree, recursively."""
    out = list(tree["main_calls"])
    for subs in tree["sub_calls"]:
        for sub in subs:
            out.extend(_calls(sub))
    return out


@pytest.fixture(scope="module")
def fixture_texts():
    """(SoS+ traces, APR call strings) from the reference fixture."""
    with gzip.open(FIXTURE, "rt") as f:
        rows = [json.loads(line) for line in f]
    sosp = [r["sosp"]["trace"] for r in rows]
    apr = [c for r in rows for c in _calls(r["apr"]["tree"])]
    return sosp, apr


def _is_byte(ids):
    return (ids >= TOK.byte_offset) & (ids < TOK.byte_offset + tk.NUM_BYTES)


# ------------------------------------------------------------------------ vocabulary
def test_vocab_layout():
    assert TOK.pad_id == 0 and {TOK.bos_id, TOK.eos_id} == {1, 2}
    assert TOK.vocab_size == len(TOK.vocab) == len(TOK) < 2**16
    assert TOK.storage_dtype == np.uint16
    assert len(set(TOK.vocab)) == TOK.vocab_size
    assert TOK.vocab[TOK.byte_offset + 0xAB] == "<0xAB>"
    assert [TOK.token_str(i) for i in TOK.digit_ids] == list("0123456789")
    assert isinstance(tk.VOCAB_VERSION, int)


def test_vocab_is_deterministic():
    assert CountdownTokenizer().vocab == TOK.vocab


def test_phrases_are_single_tokens():
    for phrase in tk.PHRASES:
        ids = TOK.encode(phrase)
        assert len(ids) == 1 and TOK.token_str(ids[0]) == phrase, phrase
        assert TOK.token_id(phrase) == ids[0]
    line = "Exploring Operation: 53-26=27, Resulting Numbers: [22, 31, 27]"
    assert [TOK.token_str(i) for i in TOK.encode(line)] == [
        "Exploring Operation: ",
        "5",
        "3",
        "-",
        "2",
        "6",
        "=",
        "2",
        "7",
        ", Resulting Numbers: ",
        "[",
        "2",
        "2",
        ", ",
        "3",
        "1",
        ", ",
        "2",
        "7",
        "]",
    ]


def test_digits_and_chars_are_single_tokens():
    assert TOK.encode("0123456789").tolist() == TOK.digit_ids.tolist()
    for ch in " \n+-*/=,:[]'#<>()":
        assert len(TOK.encode(ch)) == 1, repr(ch)
    assert not _is_byte(TOK.encode("9876543210 +-*/=,:[]'#<>()\n")).any()


def test_token_id_rejects_non_tokens():
    with pytest.raises(ValueError, match="not a single token"):
        TOK.token_id("Goal")


# ------------------------------------------------------------------------ round trip
def test_fixture_round_trip(fixture_texts):
    for text in fixture_texts[0] + fixture_texts[1]:
        ids = TOK.encode(text)
        assert ids.dtype == np.int32
        assert TOK.decode(ids) == text
        assert not _is_byte(ids).any(), "fixture text needed the byte fallback"


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_text(text):
    assert TOK.decode(TOK.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(categories=["Cs", "Cc"]) | st.characters()))
def test_round_trip_with_surrogates_and_controls(text):
    assert TOK.decode(TOK.encode(text)) == text


_PIECES = st.sampled_from(
    list(tk.PHRASES) + list(tk.DIGITS) + list(tk.CHARS) + ["No solution", "Goal", "é", "\ud800", "\x00", "😀"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=40))
def test_round_trip_language_pieces(pieces):
    text = "".join(pieces)
    ids = TOK.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id
    assert TOK.decode(ids) == text


def test_surrogate_pair_stays_two_code_points():
    text = "\ud83d\ude00 and \U0001f600"
    assert TOK.decode(TOK.encode(text)) == text


def test_decode_specials_and_invalid_bytes():
    ids = [TOK.bos_id] + TOK.encode("7+3").tolist() + [TOK.eos_id, TOK.pad_id]
    assert TOK.decode(ids) == "7+3"
    assert TOK.decode(ids, skip_special=False) == "<bos>7+3<eos><pad>"
    assert TOK.decode([]) == ""
    # A lone continuation byte (never produced by encode) decodes as U+FFFD, no error.
    assert TOK.decode([TOK.byte_offset + 0x80, TOK.digit_ids[1]]) == "\ufffd1"


# ------------------------------------------------------------------------ batches
def test_batch_matches_single(fixture_texts):
    texts = fixture_texts[0][:20] + fixture_texts[1][:20] + ["", "é\ud800"]
    ids, lengths = TOK.encode_batch(texts, add_bos=True, add_eos=True)
    assert ids.dtype == np.int32 and lengths.dtype == np.int32
    assert ids.shape == (len(texts), lengths.max())
    for row, n, text in zip(ids, lengths, texts):
        single = TOK.encode(text, add_bos=True, add_eos=True)
        assert n == len(single)
        assert row[:n].tolist() == single.tolist()
        assert (row[n:] == TOK.pad_id).all()
    assert TOK.decode_batch(ids, lengths) == texts
    assert TOK.decode_batch(ids) == texts  # padding is skipped


def test_batch_max_len_and_dtype():
    ids, lengths = TOK.encode_batch(["1+2", "10"], max_len=8, dtype=np.uint16)
    assert ids.shape == (2, 8) and ids.dtype == np.uint16
    assert lengths.tolist() == [3, 2]
    ids, lengths = TOK.encode_batch([], max_len=4)
    assert ids.shape == (0, 4) and lengths.shape == (0,)


# ------------------------------------------------------------------------ errors
def _one_line_error(fn, match):
    with pytest.raises(ValueError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_errors_are_one_line():
    msg = _one_line_error(lambda: TOK.decode([5, TOK.vocab_size]), "out of range")
    assert str(TOK.vocab_size) in msg and f"[0, {TOK.vocab_size})" in msg
    _one_line_error(lambda: TOK.decode([-1]), "token id -1")
    _one_line_error(lambda: TOK.token_str(10**6), "token id 1000000")
    msg = _one_line_error(lambda: TOK.encode_batch(["1", "123456"], max_len=3), "max_len=3")
    assert "text 1 has 6 tokens" in msg
    _one_line_error(lambda: TOK.encode_batch(["1"], dtype=np.uint8), "cannot hold")
    _one_line_error(lambda: TOK.decode([1.5]), "integers")
    with pytest.raises(TypeError):
        TOK.encode(b"bytes")


# ------------------------------------------------------------------------ compression
def test_compression(fixture_texts):
    sosp, apr = fixture_texts
    for name, texts, bound in (("SoS+ traces", sosp, 2.9), ("APR calls", apr, 2.6)):
        n_tok = sum(len(TOK.encode(t)) for t in texts)
        n_chr = sum(len(t) for t in texts)
        print(f"{name}: {len(texts)} texts, {n_tok / len(texts):.1f} tokens/text, {n_chr / n_tok:.2f} chars/token")
        assert n_chr / n_tok >= bound
