"""Property-based fuzzing of everything that reads outside data: tables, MMC4 and OBELICS
records, tars and images. Valid inputs of each format are corrupted (truncation, byte flips,
wrong JSON types, nulls, duplicates, huge values); the properties: nothing crashes, every good
sample arrives intact, and written + skipped = inputs.

A few examples per test run by default, the same ones every time (derandomised); for a real
hunt: ``FLAMINGO_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py`` (random, and more of them).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from webdataset import TarWriter

from data_prep import interleaved, pairs
from data_prep.interleaved import obelics_chunks
from flamingo.data.images import decode_image
from flamingo.data.schema import SkipSample
from flamingo.data.shards import ShardError, read_shard
from tests.test_data import loader

EXAMPLES = int(os.environ.get("FLAMINGO_FUZZ_EXAMPLES", "0"))
fuzz = settings(
    max_examples=EXAMPLES or 15,
    derandomize=not EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def png(colour=(200, 30, 30), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def summary_of(out: Path, prefix: str) -> dict:
    return json.loads((out / f"{prefix}-summary.json").read_text())


def written(out: Path, prefix: str) -> list[dict]:
    return [s for p in sorted(out.glob(f"{prefix}-*.tar")) for s in read_shard(str(p))]


# -- strategies ----------------------------------------------------------------------------------

captions = st.text(min_size=1, max_size=40).filter(lambda t: t.split())
not_null = st.one_of(
    st.integers(-5, 5),
    st.floats(allow_nan=True),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
junk = st.one_of(st.none(), not_null)


@st.composite
def bad_jsonl_line(draw) -> tuple[bytes, str]:
    """A line that must be skipped, and the reason it is counted under."""
    good = json.dumps({"image": "a.png", "caption": draw(captions)}, ensure_ascii=False)
    kind = draw(st.sampled_from(["bytes", "cut", "types", "missing", "huge", "deep", "array"]))
    if kind == "bytes":  # a Latin-1 or random byte where UTF-8 was promised
        raw = good.encode()
        at = draw(st.integers(1, len(raw) - 1))
        return raw[:at] + draw(st.sampled_from([b"\xe9", b"\xff", b"\xc3(", b"\x80"])) + raw[
            at:
        ], "bad_encoding"
    if kind == "cut":
        return good[: draw(st.integers(1, len(good) - 2))].encode(), "bad_json"
    if kind == "types":
        field = draw(st.sampled_from(["image", "caption"]))
        value = draw(not_null)
        row = {"image": "a.png", "caption": "x", field: value}
        return json.dumps(row).encode(), "bad_record"
    if kind == "missing":
        row = draw(
            st.sampled_from([{"image": "a.png"}, {"caption": "x"}, {"image": None, "caption": "x"}])
        )
        return json.dumps(row).encode(), "missing_key"
    if kind == "huge":  # an integer longer than Python will parse
        return b'{"image": "a.png", "caption": "x", "id": ' + b"9" * 5000 + b"}", "bad_json"
    if kind == "deep":
        return b"[" * 100_000 + b"]" * 100_000, "bad_json"
    return json.dumps(draw(st.lists(st.integers(), max_size=3))).encode(), "bad_json"


# -- tables ------------------------------------------------------------------------------------


@fuzz
@given(
    rows=st.lists(
        st.one_of(captions.map(lambda c: ("good", c)), bad_jsonl_line().map(lambda b: ("bad", b))),
        min_size=1,
        max_size=12,
    ),
    duplicate=st.booleans(),
)
def test_jsonl_tables(rows, duplicate):
    if duplicate and rows[0][0] == "good":
        rows = rows + [rows[0]]  # the same row twice: two samples, two keys
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "a.png").write_bytes(png())
        lines, good, bad = [], [], Counter()
        for kind, value in rows:
            if kind == "good":
                row = {"image": "a.png", "caption": value, "score": float("nan"), "url": "u"}
                lines.append(json.dumps(row, ensure_ascii=False).encode())
                good.append(" ".join(value.split()))
            else:
                lines.append(value[0])
                bad[value[1]] += 1
        (tmp / "t.jsonl").write_bytes(b"\n".join(lines) + b"\n")
        out = tmp / "out"
        pairs.main(
            [
                "--max-skip-ratio",
                "1",
                "--table",
                str(tmp / "t.jsonl"),
                "--image-root",
                str(tmp),
                "--out",
                str(out),
                "--items-per-shard",
                "4",
            ]
        )
        s = summary_of(out, "pairs")
        assert s["samples_written"] == len(good) and Counter(s["skipped"]) == bad
        samples = written(out, "pairs")
        assert [x["txt"].decode() for x in samples] == good
        assert all(x["png"] == png() for x in samples)
        assert len({x["__key__"] for x in samples}) == len(samples)
        for x in samples:
            assert json.loads(x["json"]) == {"url": "u"}  # strict JSON: the NaN score left out


@fuzz
@given(
    rows=st.lists(
        st.one_of(
            captions.map(lambda c: ("good", c)),
            st.sampled_from(["bytes", "fields", "huge", "empty"]).map(lambda k: ("bad", k)),
        ),
        min_size=1,
        max_size=10,
    )
)
def test_csv_tables(rows):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "a.png").write_bytes(png())
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["image", "caption"])
        good, bad, raw_rows = [], Counter(), []
        for kind, value in rows:
            line = io.StringIO()
            if kind == "good":
                csv.writer(line).writerow(["a.png", value])
                good.append(" ".join(value.split()))
                raw_rows.append(line.getvalue().encode())
            elif value == "bytes":
                raw_rows.append(b"a.png,caf\xe9\r\n")
                bad["bad_encoding"] += 1
            elif value == "fields":
                raw_rows.append(b"a.png,one,two\r\n")
                bad["bad_csv"] += 1
            elif value == "huge":  # over csv.field_size_limit()
                raw_rows.append(b'a.png,"' + b"x" * 200_000 + b'"\r\n')
                bad["bad_csv"] += 1
            else:
                raw_rows.append(b"a.png,\r\n")
                bad["empty_text"] += 1
        (tmp / "t.csv").write_bytes(text.getvalue().encode() + b"".join(raw_rows))
        out = tmp / "out"
        pairs.main(
            [
                "--max-skip-ratio",
                "1",
                "--table",
                str(tmp / "t.csv"),
                "--image-root",
                str(tmp),
                "--out",
                str(out),
            ]
        )
        s = summary_of(out, "pairs")
        assert s["samples_written"] == len(good) and Counter(s["skipped"]) == bad
        assert [x["txt"].decode() for x in written(out, "pairs")] == good


# -- MMC4 and OBELICS records --------------------------------------------------------------------


@st.composite
def mmc4_doc(draw) -> dict:
    n_sentences = draw(st.integers(1, 4))
    n_images = draw(st.integers(1, n_sentences))
    sentences = [f"sentence {k} {draw(captions)}" for k in range(n_sentences)]
    sims = [[draw(st.floats(0.25, 1.0)) for _ in sentences] for _ in range(n_images)]
    infos = [
        {"image_name": f"{i % 2}.png", "matched_text_index": 0, "matched_sim": 0.3}
        for i in range(n_images)
    ]
    return {"text_list": sentences, "image_info": infos, "similarity_matrix": sims}


@st.composite
def broken_mmc4_doc(draw) -> tuple[dict, str]:
    doc = draw(mmc4_doc())
    field = draw(st.sampled_from(["text_list", "image_info", "similarity_matrix", "drop"]))
    if field == "drop":
        del doc[draw(st.sampled_from(["text_list", "image_info"]))]
        return doc, "missing_key"
    if field == "text_list":
        doc["text_list"] = draw(st.sampled_from(["one string", [1, 2], [None], {"a": 1}]))
    elif field == "image_info":
        choice = draw(st.sampled_from(["string", "entry", "name", "null_name"]))
        infos = doc["image_info"]
        if choice == "string":
            doc["image_info"] = "0.png"
        elif choice == "entry":
            infos[draw(st.integers(0, len(infos) - 1))] = "0.png"
        else:
            infos[0]["image_name"] = 5 if choice == "name" else None
    else:
        sims = doc["similarity_matrix"]
        choice = draw(st.sampled_from(["null", "string", "nan", "rows", "wide", "type"]))
        if choice in ("null", "string", "nan"):
            sims[0][draw(st.integers(0, len(sims[0]) - 1))] = {
                "null": None,
                "string": "0.3",
                "nan": float("nan"),
            }[choice]
        elif choice == "rows":
            sims.append(list(sims[0]))
        elif choice == "wide":  # a sentence index past text_list
            sims[0].append(0.99)
        else:
            doc["similarity_matrix"] = "0.3"
    return doc, "bad_record"


@fuzz
@given(
    docs=st.lists(
        st.one_of(mmc4_doc().map(lambda d: (d, None)), broken_mmc4_doc()), min_size=1, max_size=8
    )
)
def test_mmc4_documents(docs):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "imgs").mkdir()
        (tmp / "imgs" / "0.png").write_bytes(png((255, 0, 0)))
        (tmp / "imgs" / "1.png").write_bytes(png((0, 0, 255)))
        lines = [json.dumps(d, ensure_ascii=False) for d, _ in docs]
        (tmp / "d.jsonl").write_text("\n".join(lines) + "\n")
        out = tmp / "out"
        interleaved.main(
            [
                "mmc4",
                "--max-skip-ratio",
                "1",
                "--jsonl",
                str(tmp / "d.jsonl"),
                "--images",
                str(tmp / "imgs"),
                "--out",
                str(out),
            ]
        )
        s = summary_of(out, "mmc4")
        good = [d for d, reason in docs if reason is None]
        assert Counter(s["skipped"]) == Counter(r for _, r in docs if r is not None)
        samples = written(out, "mmc4")
        assert s["samples_written"] == len(samples) == len(good)
        for sample, doc in zip(samples, good, strict=True):
            chunks = json.loads(sample["json"])["chunks"]
            texts = [c["text"] for c in chunks if "text" in c]
            assert texts == [t.strip() for t in doc["text_list"]]  # every sentence, in order
            assert sum("image" in c for c in chunks) == len(doc["image_info"])


@fuzz
@given(
    texts_images=st.lists(
        st.one_of(
            captions.map(lambda t: (t, None)),
            st.just((None, "image")),
            st.tuples(junk, junk),
        ),
        min_size=1,
        max_size=6,
    ),
    extra=st.booleans(),
)
def test_obelics_records(texts_images, extra):
    texts = [t for t, _ in texts_images]
    images = [png() if i == "image" else i for _, i in texts_images]
    if extra:
        images.append(None)  # lists of different lengths
    expected, well_formed = [], not extra
    for t, i in zip(texts, images, strict=False):  # the schema, written out by hand
        if (t is not None and not isinstance(t, str)) or (t is not None and i is not None):
            well_formed = False
        elif isinstance(i, bytes):
            expected.append("image")
        elif isinstance(i, dict):
            pass  # neither bytes nor a path: the image is dropped
        elif i is not None:
            well_formed = False
        elif t is not None and t.strip():
            expected.append(t.strip())
    try:
        chunks = obelics_chunks({"texts": texts, "images": images}, None, Counter(), 10**6)
    except SkipSample as e:
        assert not well_formed and e.reason == "bad_record", (texts, images)
        return
    assert well_formed, (texts, images)
    assert [c if isinstance(c, str) else "image" for c in chunks] == expected


# -- tars ------------------------------------------------------------------------------------------


def make_tar(path: Path, n: int) -> list[dict]:
    samples = [
        {"__key__": f"s{i:03d}", "png": png((i * 20, 0, 0)), "txt": f"caption {i}".encode()}
        for i in range(n)
    ]
    with TarWriter(str(path), encoder=False) as w:
        for s in samples:
            w.write(s)
    return samples


def first_data_offsets(path: Path) -> tuple[list[int], int]:
    """Per sample, where its first member's data starts; and where the last data ends."""
    import tarfile

    firsts, seen, end = [], set(), 0
    with tarfile.open(path) as tar:
        for m in tar:
            key = m.name.split(".")[0]
            if key not in seen:
                seen.add(key)
                firsts.append(m.offset_data)
            end = m.offset_data + -(-m.size // 512) * 512
    return firsts, end


@fuzz
@given(n=st.integers(1, 5), data=st.data())
def test_truncated_tars_keep_every_complete_sample(n, data):
    with tempfile.TemporaryDirectory() as tmp:
        full = Path(tmp) / "full.tar"
        samples = make_tar(full, n)
        raw = full.read_bytes()
        cut = data.draw(st.integers(0, len(raw)))
        (Path(tmp) / "cut.tar").write_bytes(raw[:cut])
        firsts, end = first_data_offsets(full)
        # a sample is known complete once the next one's first header is read, or the end
        complete = [
            i for i in range(n) if (firsts[i + 1] <= cut if i + 1 < n else cut >= end + 512)
        ]
        got = []
        try:
            for sample in read_shard(str(Path(tmp) / "cut.tar")):
                got.append(sample)
            damaged = False
        except ShardError:
            damaged = True
        assert damaged == (len(complete) < n)
        assert [g["__key__"] for g in got] == [samples[i]["__key__"] for i in complete]
        for g in got:
            original = samples[int(g["__key__"][1:])]
            assert g["png"] == original["png"] and g["txt"] == original["txt"]


@fuzz
@given(n=st.integers(1, 5), data=st.data())
def test_tars_with_flipped_bytes_never_stop_the_loader(n, data, processor):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "flipped.tar"
        make_tar(path, n)
        raw = bytearray(path.read_bytes())
        for at in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8)):
            raw[at] ^= data.draw(st.integers(1, 255))
        path.write_bytes(bytes(raw))
        batches = loader(
            processor, "pairs", str(path), batch_size=1, min_samples_for_skip_rate=10**6
        )
        delivered = list(batches)
        stats = batches.stats()
        skipped = sum(v for k, v in stats.items() if k.startswith("skip/"))
        assert stats["ok"] + skipped == stats["seen"] and len(delivered) == stats["ok"]


# -- images ------------------------------------------------------------------------------------------


@fuzz
@given(
    fmt=st.sampled_from(["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"]),
    mode=st.sampled_from(["RGB", "L", "RGBA", "P"]),
    size=st.tuples(st.integers(1, 24), st.integers(1, 24)),
    damage=st.sampled_from(["none", "truncate", "flip", "prefix"]),
    data=st.data(),
)
def test_images_decode_or_skip(fmt, mode, size, damage, data):
    if fmt == "JPEG" and mode in ("RGBA", "P"):
        mode = "RGB"
    bands = {"RGB": 3, "L": 1, "RGBA": 4, "P": 1}[mode]
    pixels = data.draw(
        st.binary(min_size=size[0] * size[1] * bands, max_size=size[0] * size[1] * bands)
    )
    image = Image.frombytes(mode, size, pixels)
    if mode == "P":
        image.putpalette(list(range(256)) * 3)
    buf = io.BytesIO()
    image.save(buf, fmt)
    raw = bytearray(buf.getvalue())
    if damage == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif damage == "flip":
        for at in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=6)):
            raw[at] ^= data.draw(st.integers(1, 255))
    elif damage == "prefix":
        raw = bytearray(data.draw(st.binary(min_size=1, max_size=16))) + raw
    try:
        decoded, _ = decode_image(bytes(raw), 10**6)
    except SkipSample as e:
        assert damage != "none", e
        assert e.reason in ("image_decode_error", "image_too_large")
        return
    assert decoded.mode == "RGB" and decoded.width * decoded.height > 0
    if damage == "none":
        assert decoded.size == size
        if fmt in ("PNG", "BMP", "TIFF") and mode in ("RGB", "L"):  # lossless: same pixels
            assert decoded.tobytes() == image.convert("RGB").tobytes()


# -- marker strings in text --------------------------------------------------------------------

marker_soup = st.lists(
    st.sampled_from(
        [
            "<",
            ">",
            "|",
            "image",
            "<image>",
            "<ima",
            "ge>",
            "<|endofchunk|>",
            "<|endof",
            "chunk|>",
            "<PAD>",
            "<|endoftext|>",
            "endoftext",
            "a",
            " ",
        ]
    ),
    min_size=1,
    max_size=12,
).map("".join)


@fuzz
@given(caption=marker_soup, text=marker_soup)
def test_text_never_makes_special_tokens(caption, text, processor):
    from flamingo.data.schema import encode_interleaved, encode_pair
    from flamingo.data.writing import write_shards

    special = processor.special_tokens
    eos = processor.tokenizer.eos_token_id
    with tempfile.TemporaryDirectory() as tmp:
        samples = [
            encode_pair("p", png(), "png", caption + " x"),
            encode_interleaved("d", [text, (png(), "png"), caption + " y"]),
        ]
        write_shards(samples[:1], lambda s: s, tmp, "p")
        write_shards(samples[1:], lambda s: s, tmp, "d")
        for kind, prefix in (("pairs", "p"), ("interleaved", "d")):
            data = loader(
                processor,
                kind,
                f"{tmp}/{prefix}-00000.tar",
                batch_size=1,
                seq_len=128,
                p_next_image=0.0,
            )
            (batch,) = list(data)
            ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
            assert ids.count(special.image_id) == 1 == batch["pixel_values"].shape[0]
            assert ids.count(special.end_of_chunk_id) == 1 and special.pad_id not in ids
            assert ids.count(eos) == 1 and ids[-1] == eos
