"""Model-folder files: SentencePiece vocabularies, added tokens, output tokenizer files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lazymerge.errors import InputError, TokenizerFileError
from lazymerge.io.hf_folder import output_companion_files, read_vocab


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def sentencepiece_model(pieces: list[str]) -> bytes:
    """A ModelProto as sentencepiece writes it: repeated field 1 (piece, score, type), then more."""
    body = b""
    for piece in pieces:
        score = varint(2 << 3 | 5) + b"\x00\x00\x80\xbf"  # float -1.0
        kind = varint(3 << 3 | 0) + varint(1)
        body += field(1, field(1, piece.encode()) + score + kind)
    return body + field(2, b"\x08\x01")  # trainer spec, skipped


def test_sentencepiece_vocab_and_added_tokens(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model(["<unk>", "<s>", "</s>", "▁the", "ñ"]))
    (tmp_path / "added_tokens.json").write_text(json.dumps({"[PAD]": 5}))
    assert read_vocab(tmp_path) == {"<unk>": 0, "<s>": 1, "</s>": 2, "▁the": 3, "ñ": 4, "[PAD]": 5}
    (tmp_path / "added_tokens.json").write_text(json.dumps({"[PAD]": 3}))
    with pytest.raises(InputError, match="gives id 3 to both"):
        read_vocab(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\xff\xff")
    with pytest.raises(InputError, match="not a readable SentencePiece model"):
        read_vocab(tmp_path)
    assert read_vocab(tmp_path / "missing") is None


def test_appended_tokens_written_to_every_tokenizer_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 4, "model_type": "llama"}))
    (tmp_path / "tokenizer.json").write_text(
        json.dumps(
            {"model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1, "c": 2, "d": 3}}, "added_tokens": []}
        )
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {}}))
    files = output_companion_files(tmp_path, [("[PAD]", 4, {"special": True, "normalized": False})], 5)
    assert json.loads(files["config.json"])["vocab_size"] == 5
    assert json.loads(files["tokenizer.json"])["added_tokens"][0]["content"] == "[PAD]"
    assert json.loads(files["tokenizer_config.json"])["added_tokens_decoder"]["4"]["content"] == "[PAD]"
    assert "added_tokens.json" not in files  # only written where the model had one, or no tokenizer.json


def test_sentencepiece_and_added_tokens_json_are_checked(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model(["<unk>", "a", "a"]))
    with pytest.raises(TokenizerFileError, match='piece "a" appears at ids 1 and 2'):
        read_vocab(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model(["<unk>", "a"]))
    for doc, fragment in (
        (["[PAD]"], "is a JSON array, expected an object of token -> id"),  # was silently ignored
        ({"[PAD]": -1}, 'gives token "[PAD]" the id -1'),  # was a NaN embedding row
        ({"[PAD]": 2.0}, "the id 2.0"),
        ({"[PAD]": 1}, 'gives id 1 to both "a" (tokenizer.model) and "[PAD]" (added_tokens.json)'),
    ):
        (tmp_path / "added_tokens.json").write_text(json.dumps(doc))
        with pytest.raises(TokenizerFileError, match=re.escape(fragment)) as info:
            read_vocab(tmp_path)
        assert str(tmp_path / "added_tokens.json") in str(info.value)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"[PAD]": 2}))
    assert read_vocab(tmp_path) == {"<unk>": 0, "a": 1, "[PAD]": 2}
