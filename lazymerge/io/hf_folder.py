"""The non-weight files of a Hugging Face model folder: config.json and the tokenizer.

Token identity comes from here: `read_vocab` returns token -> id from `tokenizer.json` (the
model's vocabulary plus its added tokens), else from a SentencePiece `tokenizer.model` (parsed
directly, no sentencepiece package needed) plus `added_tokens.json`. `output_companion_files`
writes the config and tokenizer files of the output, with the tokens it gained.

These files are untrusted input, held to the safetensors header's standard: UTF-8 JSON with
bounded size and nesting and no repeated key, every field lazymerge reads type-checked (token ids
are integers in [0, 2**32 - 1], unique), one error class per file kind (`ConfigFileError`,
`TokenizerFileError`) and a one-line message naming the file and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lazymerge.errors import ConfigFileError, InputError, TokenizerFileError
from lazymerge.io.small_files import describe_json, parse_json, read_small_file

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


#: Largest config or tokenizer file read, in bytes (tokenizer.json of a 262k vocabulary is ~33 MB).
MAX_JSON_BYTES = 128 << 20
#: Token ids must fit the unsigned 32-bit ids of the tokenizers library.
MAX_TOKEN_ID = 2**32 - 1
#: Flags of an added token that lazymerge copies into the output's tokenizer files.
ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")
#: config.json fields lazymerge reads, with the type each must have (absent is always fine).
CONFIG_FIELDS: dict[str, str] = {
    "architectures": "a list of strings or null",
    "model_type": "a string",
    "vocab_size": "a positive integer or null",
    "hidden_size": "a positive integer or null",
    "num_hidden_layers": "a positive integer or null",
    "intermediate_size": "a positive integer or null",
    "num_attention_heads": "a positive integer or null",
    "num_key_value_heads": "a positive integer or null",
    "head_dim": "a positive integer or null",
    "tie_word_embeddings": "true or false",
    "pad_token_id": "an integer or null",
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_token_id(value: Any) -> bool:
    return _is_int(value) and 0 <= value <= MAX_TOKEN_ID


def _config_value_ok(field: str, value: Any) -> bool:
    if field == "architectures":
        return value is None or (isinstance(value, list) and all(isinstance(a, str) for a in value))
    if field == "model_type":
        return isinstance(value, str)
    if field == "tie_word_embeddings":
        return isinstance(value, bool)
    if field == "pad_token_id":
        return value is None or _is_int(value)
    return value is None or (_is_int(value) and value > 0)


def _load_json(path: Path, error: type[InputError]) -> Any:
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise error(f"{path}: is {size} bytes, over the {MAX_JSON_BYTES}-byte limit for a JSON file")
        raw = read_small_file(path, MAX_JSON_BYTES)
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None
    return parse_json(raw, str(path), error, limit=MAX_JSON_BYTES)


def check_config(config: Any, path: Path) -> dict[str, Any]:
    """A config.json document, checked: an object whose fields lazymerge reads have their types.

    Raises:
        ConfigFileError
    """
    if not isinstance(config, dict):
        raise ConfigFileError(f"{path}: is {describe_json(config)}, not a JSON object")
    for field, expected in CONFIG_FIELDS.items():
        if field in config and not _config_value_ok(field, config[field]):
            raise ConfigFileError(
                f"{path}: field {field!r} must be {expected}, found {describe_json(config[field])}"
            )
    return config


def read_config(folder: Path | None) -> dict[str, Any] | None:
    """The folder's config.json, checked (see `check_config`), or None without one.

    Raises:
        ConfigFileError
    """
    if folder is None or not (folder / "config.json").is_file():
        return None
    return check_config(_load_json(folder / "config.json", ConfigFileError), folder / "config.json")


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
    """The pieces of a SentencePiece model in id order (ModelProto field 1, piece field 1).

    Raises:
        TokenizerFileError for an unreadable model or a piece given twice.
    """
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise TokenizerFileError(f"{path}: is {size} bytes, over the {MAX_JSON_BYTES}-byte limit")
        pieces = []
        for number, wire, value in _fields(read_small_file(path, MAX_JSON_BYTES)):
            if number == 1 and wire == 2:
                piece = next((v for n, w, v in _fields(value) if n == 1 and w == 2), b"")
                pieces.append(piece.decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise TokenizerFileError(f"{path}: not a readable SentencePiece model ({exc})") from None
    seen: dict[str, int] = {}
    for i, piece in enumerate(pieces):
        if piece in seen:
            raise TokenizerFileError(
                f"{path}: piece {describe_json(piece)} appears at ids {seen[piece]} and {i}; the model is ambiguous"
            )
        seen[piece] = i
    return pieces


def _check_added_token(entry: Any, where: str) -> None:
    if not isinstance(entry, dict):
        raise TokenizerFileError(
            f"{where}: must be an object with content and id, found {describe_json(entry)}"
        )
    if not isinstance(entry.get("content"), str):
        raise TokenizerFileError(
            f"{where}: content must be a string, found {describe_json(entry.get('content'))}"
        )
    for flag in ADDED_TOKEN_FLAGS:
        if flag in entry and not isinstance(entry[flag], bool):
            raise TokenizerFileError(
                f"{where}: {flag} must be true or false, found {describe_json(entry[flag])}"
            )


def _tokenizer_json(path: Path) -> tuple[dict[str, Any], list[tuple[str, int]]]:
    """tokenizer.json read and checked (see `_check_tokenizer_json`)."""
    return _check_tokenizer_json(_load_json(path, TokenizerFileError), path)


def _check_tokenizer_json(doc: Any, path: Path) -> tuple[dict[str, Any], list[tuple[str, int]]]:
    """A tokenizer.json document checked: the document and (token, id) of its model vocabulary
    then its added tokens, in file order.

    Raises:
        TokenizerFileError
    """
    if not isinstance(doc, dict):
        raise TokenizerFileError(f"{path}: is {describe_json(doc)}, not a JSON object")
    model = doc.get("model")
    if not isinstance(model, dict):
        raise TokenizerFileError(
            f"{path}: model must be an object holding vocab, found {describe_json(model)}"
        )
    pairs = _model_vocab_pairs(model.get("vocab"), path)
    seen: dict[str, int] = {}
    for token, token_id in pairs:  # a Unigram piece given twice
        if token in seen:
            raise TokenizerFileError(
                f"{path}: model.vocab gives token {describe_json(token)} ids {seen[token]} and {token_id}"
            )
        seen[token] = token_id
    return doc, pairs + _added_token_pairs(doc.get("added_tokens", []), path)


def _model_vocab_pairs(model_vocab: Any, path: Path) -> list[tuple[str, int]]:
    """(token, id) of tokenizer.json's `model.vocab`: an object of token -> id (BPE, WordPiece)
    or a list of [piece, score] in id order (Unigram)."""
    pairs: list[tuple[str, int]] = []
    if isinstance(model_vocab, dict):
        for token, token_id in model_vocab.items():
            if not _is_token_id(token_id):
                raise TokenizerFileError(
                    f"{path}: model.vocab gives token {describe_json(token)} the id {describe_json(token_id)}; "
                    f"expected an integer in [0, {MAX_TOKEN_ID}]"
                )
            pairs.append((token, token_id))
    elif isinstance(model_vocab, list):  # Unigram: [[piece, score], ...] in id order
        for i, item in enumerate(model_vocab):
            if not (
                isinstance(item, list)
                and len(item) == 2
                and isinstance(item[0], str)
                and isinstance(item[1], (int, float))
                and not isinstance(item[1], bool)
            ):
                raise TokenizerFileError(
                    f"{path}: model.vocab entry {i} must be [piece string, score number], found {describe_json(item)}"
                )
            pairs.append((item[0], i))
    else:
        raise TokenizerFileError(
            f"{path}: model.vocab must be an object (token -> id) or a list ([piece, score]), found "
            f"{describe_json(model_vocab)}; cannot tell which token each row is"
        )
    return pairs


def _added_token_pairs(added: Any, path: Path) -> list[tuple[str, int]]:
    """(content, id) of tokenizer.json's `added_tokens`, each entry checked, no token twice
    with different ids."""
    if not isinstance(added, list):
        raise TokenizerFileError(f"{path}: added_tokens must be a list, found {describe_json(added)}")
    pairs: list[tuple[str, int]] = []
    added_ids: dict[str, int] = {}
    for i, entry in enumerate(added):
        where = f"{path}: added_tokens[{i}]"
        _check_added_token(entry, where)
        token_id = entry.get("id")
        if not _is_token_id(token_id):
            raise TokenizerFileError(
                f"{where}: id must be an integer in [0, {MAX_TOKEN_ID}], found "
                f"{'no id' if 'id' not in entry else describe_json(token_id)}"
            )
        content = entry["content"]
        if added_ids.get(content, token_id) != token_id:
            raise TokenizerFileError(
                f"{where}: token {describe_json(content)} is added twice, with ids {added_ids[content]} and {token_id}"
            )
        added_ids[content] = token_id
        pairs.append((content, token_id))
    return pairs


def _added_tokens_json(path: Path) -> dict[str, int]:
    doc = _load_json(path, TokenizerFileError)
    if not isinstance(doc, dict):
        raise TokenizerFileError(f"{path}: is {describe_json(doc)}, expected an object of token -> id")
    for token, token_id in doc.items():
        if not _is_token_id(token_id):
            raise TokenizerFileError(
                f"{path}: gives token {describe_json(token)} the id {describe_json(token_id)}; expected an integer "
                f"in [0, {MAX_TOKEN_ID}]"
            )
    return doc


def _check_tokenizer_config(doc: Any, path: Path) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise TokenizerFileError(f"{path}: is {describe_json(doc)}, not a JSON object")
    decoder = doc.get("added_tokens_decoder", {})
    if not isinstance(decoder, dict):
        raise TokenizerFileError(
            f"{path}: added_tokens_decoder must be an object of id -> token, found {describe_json(decoder)}"
        )
    for key, entry in decoder.items():
        if not (key.isascii() and key.isdigit() and int(key) <= MAX_TOKEN_ID):
            raise TokenizerFileError(
                f"{path}: added_tokens_decoder key {describe_json(key)} is not a token id (a decimal integer "
                f"in [0, {MAX_TOKEN_ID}])"
            )
        _check_added_token(entry, f"{path}: added_tokens_decoder[{key}]")
    return doc


def read_vocab(folder: Path | None) -> dict[str, int] | None:
    """token -> id over the whole tokenizer (vocabulary and added tokens), or None without one.

    Every tokenizer file present is checked (types, ids non-negative integers, UTF-8 JSON), also
    tokenizer_config.json, which the output copies.

    Raises:
        TokenizerFileError for a malformed file, or when one id is given to two different tokens.
    """
    if folder is None:
        return None
    vocab: dict[str, int] = {}
    origin: dict[str, Path] = {}
    tokenizer_json = folder / "tokenizer.json"
    if tokenizer_json.is_file():
        pairs = _tokenizer_json(tokenizer_json)[1]
        source = tokenizer_json
    elif (folder / "tokenizer.model").is_file():
        source = folder / "tokenizer.model"
        pairs = [(piece, i) for i, piece in enumerate(sentencepiece_pieces(source))]
    else:
        return None
    for token, token_id in pairs:
        vocab[token] = token_id
        origin[token] = source
    if (folder / "added_tokens.json").is_file():
        for token, token_id in _added_tokens_json(folder / "added_tokens.json").items():
            vocab[token] = token_id
            origin[token] = folder / "added_tokens.json"
    if (folder / "tokenizer_config.json").is_file():
        config_path = folder / "tokenizer_config.json"
        _check_tokenizer_config(_load_json(config_path, TokenizerFileError), config_path)
    seen: dict[int, str] = {}
    for token, token_id in vocab.items():
        if token_id in seen:
            first = seen[token_id]
            raise TokenizerFileError(
                f"{origin[token]}: tokenizer gives id {token_id} to both {describe_json(first)} "
                f"({origin[first].name}) and {describe_json(token)} ({origin[token].name}); its files disagree"
            )
        seen[token_id] = token
    return vocab


def tokenizer_files(folder: Path | None) -> str:
    """The tokenizer files `read_vocab` reads in a folder, for messages ("a/tokenizer.json")."""
    if folder is None:
        return "no tokenizer"
    names = ["tokenizer.json"] if (folder / "tokenizer.json").is_file() else ["tokenizer.model"]
    names += ["added_tokens.json"] if (folder / "added_tokens.json").is_file() else []
    return " + ".join(str(folder / n) for n in names)


def added_token_entries(folder: Path | None) -> dict[str, dict[str, Any]]:
    """token -> its `added_tokens` entry in tokenizer.json (special flags and so on).

    Raises:
        TokenizerFileError for a malformed tokenizer.json.
    """
    if folder is None or not (folder / "tokenizer.json").is_file():
        return {}
    doc = _tokenizer_json(folder / "tokenizer.json")[0]
    return {a["content"]: a for a in doc.get("added_tokens", [])}


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

    Raises:
        ConfigFileError, TokenizerFileError for a malformed file it has to change; InputError for
        a file it cannot read.
    """
    if folder is None:
        return {}
    files = _read_companion_files(folder)
    if vocab_size is not None and "config.json" in files:
        config = check_config(
            parse_json(
                files["config.json"], str(folder / "config.json"), ConfigFileError, limit=MAX_JSON_BYTES
            ),
            folder / "config.json",
        )
        if config.get("vocab_size") != vocab_size:
            config["vocab_size"] = vocab_size
            files["config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    if appended:
        _add_tokens(files, folder, _appended_entries(appended))
    return files


def with_chat_template(files: dict[str, bytes], template: str) -> dict[str, bytes]:
    """Companion files (`output_companion_files`) with `template` as the chat template, where
    transformers' `save_pretrained` puts a single template (what mergekit writes): the file
    chat_template.jinja, no `chat_template` key in tokenizer_config.json, no chat_template.json.

    Raises:
        TokenizerFileError when tokenizer_config.json is not a JSON object.
    """
    out = dict(files)
    out.pop("chat_template.json", None)
    if "tokenizer_config.json" in out:
        name = Path("tokenizer_config.json")
        doc = _check_tokenizer_config(
            parse_json(out[name.name], str(name), TokenizerFileError, limit=MAX_JSON_BYTES), name
        )
        if "chat_template" in doc:
            del doc["chat_template"]
            out[name.name] = (json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
    out["chat_template.jinja"] = template.encode("utf-8")
    return out


def _read_companion_files(folder: Path) -> dict[str, bytes]:
    """name -> bytes of each of `COMPANION_FILES` present in `folder`, each within the size limit."""
    files: dict[str, bytes] = {}
    for name in COMPANION_FILES:
        path = folder / name
        if path.is_file():
            try:
                if path.stat().st_size > MAX_JSON_BYTES:
                    raise InputError(
                        f"{path}: is over the {MAX_JSON_BYTES}-byte limit for a model-folder file"
                    )
                files[name] = read_small_file(path, MAX_JSON_BYTES)
            except OSError as exc:
                raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return files


def _appended_entries(appended: list[tuple[str, int, dict[str, Any] | None]]) -> list[dict[str, Any]]:
    """An `added_tokens` entry per appended token: special, its flags from the model it came from."""
    entries: list[dict[str, Any]] = []
    for token, token_id, entry in appended:
        base = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        base.update({k: v for k, v in (entry or {}).items() if k in base})
        entries.append({"id": token_id, "content": token, **base})
    return entries


def _add_tokens(files: dict[str, bytes], folder: Path, entries: list[dict[str, Any]]) -> None:
    """Add `entries` to the tokenizer files in `files` (tokenizer.json, tokenizer_config.json,
    added_tokens.json, which is written too when there is no tokenizer.json)."""
    if "tokenizer.json" in files:
        path = folder / "tokenizer.json"
        doc = _check_tokenizer_json(
            parse_json(files["tokenizer.json"], str(path), TokenizerFileError, limit=MAX_JSON_BYTES), path
        )[0]
        doc.setdefault("added_tokens", []).extend(entries)
        files["tokenizer.json"] = json.dumps(doc, ensure_ascii=False, indent=2).encode()
    if "tokenizer_config.json" in files:
        path = folder / "tokenizer_config.json"
        doc = _check_tokenizer_config(
            parse_json(files["tokenizer_config.json"], str(path), TokenizerFileError, limit=MAX_JSON_BYTES),
            path,
        )
        decoder = doc.setdefault("added_tokens_decoder", {})
        for e in entries:
            decoder[str(e["id"])] = {k: v for k, v in e.items() if k != "id"}
        files["tokenizer_config.json"] = (json.dumps(doc, ensure_ascii=False, indent=2) + "\n").encode()
    if "added_tokens.json" in files or "tokenizer.json" not in files:
        added = _added_tokens_json(folder / "added_tokens.json") if "added_tokens.json" in files else {}
        added.update({e["content"]: e["id"] for e in entries})
        files["added_tokens.json"] = (json.dumps(added, ensure_ascii=False, indent=2) + "\n").encode()
