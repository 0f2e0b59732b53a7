"""Do two model folders share one tokenizer? Read from the tokenizer files, without loading one.

A merge keeps the base model's tokenizer, so every expert must have been trained with exactly it:
the same `tokenizer.json` (the whole file, not only its vocabulary), the same added tokens and the
same special tokens (a swapped bos/eos changes every prompt). `read_tokenizer` gathers those facts
from a folder; `tokenizer_difference` says in a few words what differs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from evomerge.errors import UserError

# The files a tokenizer can be loaded from, the first present one is compared whole.
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


@dataclass(frozen=True)
class TokenizerFacts:
    vocabulary_file: str
    vocabulary_digest: str  # the whole file (tokenizer.json: canonical JSON)
    sections: tuple[tuple[str, str], ...]  # tokenizer.json: top-level key -> digest, to name what differs
    added_tokens: tuple[tuple[int, str], ...]  # (id, content)
    special_tokens: tuple[tuple[str, str | None], ...]  # (bos_token, '<s>'), ...


def read_tokenizer(folder: Path, field: str) -> TokenizerFacts | None:
    """The tokenizer facts of a model folder; None when it has no tokenizer files."""
    present = [name for name in VOCABULARY_FILES if (folder / name).is_file()]
    if not present:
        return None
    name = present[0]
    sections: dict[str, str] = {}
    added: set[tuple[int, str]] = set()
    if name == "tokenizer.json":
        document = _json_object(folder / name, field)
        sections = {key: _digest(value) for key, value in document.items()}
        added |= {(int(t["id"]), str(t["content"])) for t in document.get("added_tokens") or [] if "id" in t}
        digest = _digest(document)
    else:
        digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    config = _optional_json_object(folder / "tokenizer_config.json", field)
    decoder = config.get("added_tokens_decoder") or {}
    added |= {(int(i), str(t.get("content"))) for i, t in decoder.items() if isinstance(t, dict)}
    special = {key: _content(config.get(key)) for key in SPECIAL_TOKENS}
    mapped = _optional_json_object(folder / "special_tokens_map.json", field)
    special.update({key: _content(mapped[key]) for key in SPECIAL_TOKENS if key in mapped})
    return TokenizerFacts(name, digest, tuple(sorted(sections.items())), tuple(sorted(added)), tuple(special.items()))


def tokenizer_difference(reference: TokenizerFacts, other: TokenizerFacts) -> str | None:
    """What differs, in a few words ("eos_token '<s>' where the base has '</s>'"), or None."""
    for (key, mine), (_, theirs) in zip(other.special_tokens, reference.special_tokens, strict=True):
        if mine != theirs:
            return f"{key} {mine!r} where the base has {theirs!r}"
    if other.added_tokens != reference.added_tokens:
        extra = sorted(set(other.added_tokens) ^ set(reference.added_tokens))[0]
        where = "only this model" if extra in other.added_tokens else "only the base"
        return f"added token {extra[0]} {extra[1]!r} is in {where}"
    if other.vocabulary_file != reference.vocabulary_file:
        return f"it has {other.vocabulary_file} where the base has {reference.vocabulary_file}"
    if other.vocabulary_digest != reference.vocabulary_digest:
        base_sections, own_sections = dict(reference.sections), dict(other.sections)
        keys = sorted(
            k for k in base_sections.keys() | own_sections.keys() if base_sections.get(k) != own_sections.get(k)
        )
        return f"{other.vocabulary_file} differs" + (f" in {', '.join(keys)}" if keys else "")
    return None


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _content(token) -> str | None:
    """A special token as a string: tokenizer_config.json may hold {'content': '<s>', ...}."""
    if isinstance(token, dict):
        return token.get("content")
    return None if token is None else str(token)


def _json_object(path: Path, field: str) -> dict:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{field}: '{path}' is not valid JSON; re-save the tokenizer") from None
    if not isinstance(document, dict):
        raise UserError(
            f"{field}: '{path}' holds a JSON {type(document).__name__}, not an object; re-save the tokenizer"
        )
    return document


def _optional_json_object(path: Path, field: str) -> dict:
    return _json_object(path, field) if path.is_file() else {}
