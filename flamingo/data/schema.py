"""What a shard holds: one schema per kind, shared by writers (``data_prep/``) and readers.

A shard is a tar file; a sample is the group of members sharing a key (the file name up to its
first dot, webdataset's convention), so keys never contain dots.

* **pairs**: ``KEY.<image ext>`` (encoded image bytes), ``KEY.txt`` (UTF-8 caption),
  optional ``KEY.json`` (metadata: url, size, ...).
* **interleaved**: ``KEY.json`` = ``{"chunks": [{"text": "..."}, {"image": "img0.jpg"}, ...]}``
  in document order (plus metadata), and one member per image, ``KEY.img0.jpg``, ... named by
  its chunk: images are encoded bytes in the tar, not base64 in JSON.
* **video**: ``KEY.frame0000.jpg``, ``KEY.frame0001.jpg``, ... (the clip's frames in time
  order), ``KEY.txt`` (caption), optional ``KEY.json`` (metadata: fps, source, ...).
* **conversation**: ``KEY.json`` = ``{"turns": [{"role": "user", "text": "..."}, {"role":
  "assistant", "text": "..."}, ...], "image": "img0.jpg"}`` (plus metadata; no ``image`` for a
  text-only conversation) and its image member ``KEY.img0.jpg`` (LLaVA's instruction data;
  :mod:`flamingo.chat` writes it in a template).

Readers raise :class:`SkipSample` with a reason; the pipeline counts reasons and moves on.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from flamingo.chat import check_turns

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
KINDS = ("pairs", "interleaved", "video", "conversation")
_KEY_OK = re.compile(r"^[A-Za-z0-9_\-/]+$")


class SkipSample(Exception):
    """A sample that cannot be used; ``reason`` names the counter it goes to."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def sanitize_key(key: str) -> str:
    """A webdataset-safe sample key (no dots, no spaces)."""
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", key)
    if not key:
        raise ValueError("empty sample key")
    return key


def unique_keys(names: list[str], sources: list[Any] | None = None) -> list[str]:
    """:func:`sanitize_key` of each name, made unique: names whose keys would coincide
    (``cat`` from cat.jpg and cat.png, ``a_b`` from a.b and a_b) each get a suffix hashed from
    their source (default: the name), so a key never depends on which other inputs exist
    beyond the ones it collides with."""
    keys = [sanitize_key(n) for n in names]
    sources = names if sources is None else sources
    counts: dict[str, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    return [
        f"{key}-{hashlib.sha1(str(src).encode()).hexdigest()[:10]}" if counts[key] > 1 else key
        for key, src in zip(keys, sources, strict=True)
    ]


def check_key(key: str) -> str:
    if not _KEY_OK.match(key):
        raise ValueError(f"sample key {key!r} must match {_KEY_OK.pattern} (use sanitize_key)")
    return key


# -- typed samples (after parsing, before decoding images) ---------------------------------------


@dataclass
class PairSample:
    key: str
    image: bytes
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class InterleavedSample:
    key: str
    chunks: list[str | bytes]
    """Document order: text chunks (str) and encoded images (bytes)."""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class VideoSample:
    key: str
    frames: list[bytes]
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ConversationSample:
    key: str
    turns: list[dict[str, str]]
    """``{"role": "user" | "assistant", "text": ...}``, alternating, the user first."""
    image: bytes | None
    meta: dict[str, Any] = field(default_factory=dict)


# -- writing ---------------------------------------------------------------------------------


def _image_ext(ext: str) -> str:
    ext = ext.lower().lstrip(".")
    if ext not in IMAGE_EXTS:
        raise ValueError(f"image extension {ext!r} is not one of {IMAGE_EXTS}")
    return ext


def encode_pair(
    key: str, image: bytes, image_ext: str, caption: str, meta: dict | None = None
) -> dict:
    sample = {
        "__key__": check_key(key),
        _image_ext(image_ext): image,
        "txt": caption.encode("utf-8"),
    }
    if meta:
        sample["json"] = json.dumps(meta).encode("utf-8")
    return sample


def encode_interleaved(
    key: str, chunks: list[str | tuple[bytes, str]], meta: dict | None = None
) -> dict:
    """``chunks``: text (str) or (image bytes, extension), in document order."""
    sample: dict[str, Any] = {"__key__": check_key(key)}
    doc_chunks = []
    for chunk in chunks:
        if isinstance(chunk, str):
            doc_chunks.append({"text": chunk})
        else:
            data, ext = chunk
            name = f"img{sum('image' in c for c in doc_chunks)}.{_image_ext(ext)}"
            doc_chunks.append({"image": name})
            sample[name] = data
    sample["json"] = json.dumps({**(meta or {}), "chunks": doc_chunks}).encode("utf-8")
    return sample


def encode_video(
    key: str, frames: list[bytes], frame_ext: str, caption: str, meta: dict | None = None
) -> dict:
    ext = _image_ext(frame_ext)
    sample = {"__key__": check_key(key), "txt": caption.encode("utf-8")}
    for i, frame in enumerate(frames):
        sample[f"frame{i:04d}.{ext}"] = frame
    sample["json"] = json.dumps({**(meta or {}), "num_frames": len(frames)}).encode("utf-8")
    return sample


def encode_conversation(
    key: str,
    turns: list[dict[str, str]],
    image: tuple[bytes, str] | None = None,
    meta: dict | None = None,
) -> dict:
    """``turns``: alternating user and assistant turns; ``image``: (bytes, extension) or None."""
    check_turns(turns)
    sample: dict[str, Any] = {"__key__": check_key(key)}
    doc: dict[str, Any] = {**(meta or {}), "turns": [dict(t) for t in turns]}
    if image is not None:
        name = f"img0.{_image_ext(image[1])}"
        sample[name], doc["image"] = image[0], name
    sample["json"] = json.dumps(doc).encode("utf-8")
    return sample


# -- reading ---------------------------------------------------------------------------------


def _text(raw: dict, name: str, max_chars: int) -> str:
    if name not in raw:
        raise SkipSample("missing_key", f"no .{name} member")
    try:
        text = raw[name].decode("utf-8")
    except UnicodeDecodeError as e:
        raise SkipSample("bad_encoding", str(e)) from e
    if not text.strip():
        raise SkipSample("empty_text")
    if len(text) > max_chars:
        raise SkipSample("text_too_long", f"{len(text)} > {max_chars} characters")
    return text


def _json(raw: dict, required: bool) -> dict[str, Any]:
    if "json" not in raw:
        if required:
            raise SkipSample("missing_key", "no .json member")
        return {}
    try:
        value = json.loads(raw["json"])
    except UnicodeDecodeError as e:
        raise SkipSample("bad_encoding", str(e)) from e
    except (ValueError, RecursionError) as e:  # JSONDecodeError, or a huge integer
        raise SkipSample("bad_json", f"{type(e).__name__}: {e}") from e
    if not isinstance(value, dict):
        raise SkipSample("bad_json", "top level is not an object")
    return value


def _check_members(raw: dict) -> None:
    if "__bad__" in raw:  # set by shards.read_shard
        raise SkipSample("duplicate_member", raw["__bad__"])


def decode_pair(raw: dict, max_chars: int) -> PairSample:
    _check_members(raw)
    images = [k for k in raw if k in IMAGE_EXTS]
    if not images:
        raise SkipSample("missing_key", "no image member")
    return PairSample(
        raw["__key__"], raw[images[0]], _text(raw, "txt", max_chars), _json(raw, False)
    )


def decode_interleaved(raw: dict, max_chars: int) -> InterleavedSample:
    _check_members(raw)
    doc = _json(raw, True)
    chunks = doc.pop("chunks", None)
    if not isinstance(chunks, list):
        raise SkipSample("missing_key", 'no "chunks" list')
    out: list[str | bytes] = []
    total = 0
    for chunk in chunks:
        if isinstance(chunk, dict) and isinstance(chunk.get("text"), str):
            total += len(chunk["text"])
            out.append(chunk["text"])
        elif isinstance(chunk, dict) and isinstance(chunk.get("image"), str):
            name = chunk["image"].lower()
            if name not in raw:
                raise SkipSample("missing_key", f"image member {name!r} not in the sample")
            out.append(raw[name])
        else:
            raise SkipSample("bad_json", f"chunk {chunk!r} is neither text nor image")
    if total > max_chars:
        raise SkipSample("text_too_long", f"{total} > {max_chars} characters")
    if not any(isinstance(c, bytes) for c in out):
        raise SkipSample("no_images")
    if not any(isinstance(c, str) and c.strip() for c in out):
        raise SkipSample("empty_text")
    return InterleavedSample(raw["__key__"], out, doc)


def decode_video(raw: dict, max_chars: int) -> VideoSample:
    _check_members(raw)
    names = sorted(k for k in raw if k.startswith("frame") and k.rsplit(".", 1)[-1] in IMAGE_EXTS)
    if not names:
        raise SkipSample("missing_key", "no frame members")
    return VideoSample(
        raw["__key__"], [raw[n] for n in names], _text(raw, "txt", max_chars), _json(raw, False)
    )


def decode_conversation(raw: dict, max_chars: int) -> ConversationSample:
    _check_members(raw)
    doc = _json(raw, True)
    turns = doc.pop("turns", None)
    if not isinstance(turns, list):
        raise SkipSample("missing_key", 'no "turns" list')
    try:
        check_turns(turns)
    except ValueError as e:
        raise SkipSample("bad_json", str(e)) from e
    total = sum(len(t["text"]) for t in turns)
    if total > max_chars:
        raise SkipSample("text_too_long", f"{total} > {max_chars} characters")
    replies = [t["text"] for t in turns if t["role"] == "assistant"]
    if not replies:
        raise SkipSample("empty_text", "no assistant reply")
    if not all(r.strip() for r in replies):  # trained on, it teaches answering with EOS alone
        raise SkipSample("empty_reply", "an assistant reply is empty")
    name = doc.pop("image", None)
    if name is not None and (not isinstance(name, str) or name.lower() not in raw):
        raise SkipSample("missing_key", f"image member {name!r} not in the sample")
    image = raw[name.lower()] if name is not None else None
    return ConversationSample(raw["__key__"], turns, image, doc)


DECODERS = {
    "pairs": decode_pair,
    "interleaved": decode_interleaved,
    "video": decode_video,
    "conversation": decode_conversation,
}
