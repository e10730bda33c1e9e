"""The non-weight files of a Hugging Face model folder: config.json and the tokenizer.

Token identity comes from here: `read_vocab` returns token -> id from `tokenizer.json` (the
model's vocabulary plus its added tokens), else from a SentencePiece `tokenizer.model` (parsed
directly, no sentencepiece package needed) plus `added_tokens.json`. `append_tokens` writes the
tokenizer files of an output that gained tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lazymerge.errors import InputError

#: Non-weight files of a model folder copied from the reward model (or first input) to the output.
COMPANION_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def model_folder(path: Path) -> Path | None:
    """The folder holding config and tokenizer files for an input path, if it is a model folder."""
    folder = path if path.is_dir() else path.parent
    if path.is_dir() or path.name.endswith(".index.json"):
        return folder
    return None


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: cannot read JSON ({exc})") from None


def read_config(folder: Path | None) -> dict[str, Any] | None:
    if folder is None or not (folder / "config.json").is_file():
        return None
    config = _load_json(folder / "config.json")
    if not isinstance(config, dict):
        raise InputError(f"{folder / 'config.json'}: not a JSON object")
    return config


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value) of a protobuf message, bytes for length-delimited."""
    out, pos = [], 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated field")
        out.append((number, wire, value))
    return out


def sentencepiece_pieces(path: Path) -> list[str]:
    """The pieces of a SentencePiece model in id order (ModelProto field 1, piece field 1)."""
    try:
        pieces = []
        for number, wire, value in _fields(path.read_bytes()):
            if number == 1 and wire == 2:
                piece = next((v for n, w, v in _fields(value) if n == 1 and w == 2), b"")
                pieces.append(piece.decode("utf-8"))
        return pieces
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable SentencePiece model ({exc})") from None


def read_vocab(folder: Path | None) -> dict[str, int] | None:
    """token -> id over the whole tokenizer (vocabulary and added tokens), or None without one.

    Raises:
        InputError when one id is given to two different tokens.
    """
    if folder is None:
        return None
    vocab: dict[str, int] = {}
    tokenizer_json = folder / "tokenizer.json"
    if tokenizer_json.is_file():
        doc = _load_json(tokenizer_json)
        model_vocab = doc.get("model", {}).get("vocab") if isinstance(doc, dict) else None
        if isinstance(model_vocab, dict):
            vocab.update({str(k): int(v) for k, v in model_vocab.items()})
        elif isinstance(model_vocab, list):  # Unigram: [[piece, score], ...] in id order
            vocab.update({str(p[0]): i for i, p in enumerate(model_vocab)})
        else:
            raise InputError(f"{tokenizer_json}: no model.vocab; cannot tell which token each row is")
        for added in doc.get("added_tokens", []):
            vocab[str(added["content"])] = int(added["id"])
    elif (folder / "tokenizer.model").is_file():
        vocab.update({piece: i for i, piece in enumerate(sentencepiece_pieces(folder / "tokenizer.model"))})
    else:
        return None
    if (folder / "added_tokens.json").is_file():
        added = _load_json(folder / "added_tokens.json")
        if isinstance(added, dict):
            vocab.update({str(k): int(v) for k, v in added.items()})
    seen: dict[int, str] = {}
    for token, token_id in vocab.items():
        if token_id in seen:
            raise InputError(
                f"{folder}: tokenizer gives id {token_id} to both {seen[token_id]!r} and {token!r}; "
                "its files disagree"
            )
        seen[token_id] = token
    return vocab


def added_token_entries(folder: Path | None) -> dict[str, dict[str, Any]]:
    """token -> its `added_tokens` entry in tokenizer.json (special flags and so on)."""
    if folder is None or not (folder / "tokenizer.json").is_file():
        return {}
    doc = _load_json(folder / "tokenizer.json")
    return {str(a["content"]): a for a in doc.get("added_tokens", [])}


def output_companion_files(
    folder: Path | None,
    appended: list[tuple[str, int, dict[str, Any] | None]],
    vocab_size: int | None,
) -> dict[str, bytes]:
    """The reward model's config and tokenizer files for the output, with appended tokens added.

    Args:
        folder: the model folder to copy from.
        appended: (token, new id, added-token entry from the model it came from or None).
        vocab_size: the output's embedding rows, written to config.json when it changed.
    """
    if folder is None:
        return {}
    files = {name: (folder / name).read_bytes() for name in COMPANION_FILES if (folder / name).is_file()}
    if vocab_size is not None and "config.json" in files:
        config = json.loads(files["config.json"])
        if config.get("vocab_size") != vocab_size:
            config["vocab_size"] = vocab_size
            files["config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    if not appended:
        return files
    entries = []
    for token, token_id, entry in appended:
        base = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        base.update({k: v for k, v in (entry or {}).items() if k in base})
        entries.append({"id": token_id, "content": token, **base})
    if "tokenizer.json" in files:
        doc = json.loads(files["tokenizer.json"])
        doc.setdefault("added_tokens", []).extend(entries)
        files["tokenizer.json"] = json.dumps(doc, ensure_ascii=False, indent=2).encode()
    if "tokenizer_config.json" in files:
        doc = json.loads(files["tokenizer_config.json"])
        decoder = doc.setdefault("added_tokens_decoder", {})
        for e in entries:
            decoder[str(e["id"])] = {k: v for k, v in e.items() if k != "id"}
        files["tokenizer_config.json"] = (json.dumps(doc, ensure_ascii=False, indent=2) + "\n").encode()
    if "added_tokens.json" in files or "tokenizer.json" not in files:
        doc = json.loads(files.get("added_tokens.json", b"{}"))
        doc.update({e["content"]: e["id"] for e in entries})
        files["added_tokens.json"] = (json.dumps(doc, ensure_ascii=False, indent=2) + "\n").encode()
    return files
