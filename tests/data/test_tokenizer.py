"""ByteTokenizer: exact round trips and id conventions."""

import numpy as np
import torch

from rexmoe_train.data import ByteTokenizer


def test_constants():
    tok = ByteTokenizer()
    assert tok.name == "byte"
    assert tok.eod == 256
    assert tok.vocab_size == 257


def test_round_trip_ascii_and_non_ascii():
    tok = ByteTokenizer()
    for text in ["", "def f(x):\n    return x + 1\n", "héllo wörld — ünïcödé ✓ 日本語 🚀", "\x00\t\r\n"]:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text


def test_non_ascii_is_multi_byte():
    tok = ByteTokenizer()
    assert tok.encode("é") == [0xC3, 0xA9]
    assert len(tok.encode("🚀")) == 4


def test_encode_bytes_matches_encode():
    tok = ByteTokenizer()
    text = "x = 'ß'\n"
    arr = tok.encode_bytes(text.encode("utf-8"))
    assert arr.dtype == np.uint16
    assert arr.tolist() == tok.encode(text)
    assert tok.decode(arr) == text


def test_decode_skips_eod_and_out_of_range():
    tok = ByteTokenizer()
    ids = tok.encode("ab") + [tok.eod] + [999, -1] + tok.encode("c") + [tok.eod]
    assert tok.decode(ids) == "abc"
    assert tok.decode(torch.tensor(ids)) == "abc"
    assert tok.decode(np.array(ids)) == "abc"


def test_decode_invalid_utf8_replaces():
    tok = ByteTokenizer()
    # A window boundary can cut a multi-byte character: must not raise.
    assert tok.decode(tok.encode("é")[:1] + tok.encode("a")) == "\ufffda"
