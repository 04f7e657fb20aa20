"""Real-world oddities in converter inputs and shards: each is converted, or skipped and
counted, and never stops a conversion or a run (the cases a new user's corpus met)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image
from webdataset import TarWriter

from data_prep import interleaved, pairs, video
from flamingo.data.images import decode_image
from flamingo.data.schema import encode_interleaved, encode_pair
from tests.test_data import loader, near, pixel_colour, real_ids, solid, write
from tests.test_data_prep import shard_samples, summary

RED, BLUE = (255, 0, 0), (0, 0, 255)


def captions_of(out, prefix="pairs"):
    return sorted(s["txt"].decode() for s in shard_samples(out, prefix))


# -- tables ------------------------------------------------------------------------------------


def test_a_byte_that_is_not_utf8_costs_its_row_only(tmp_path):
    (tmp_path / "a.png").write_bytes(solid(RED))
    lines = [json.dumps({"image": "a.png", "caption": f"row {i}"}).encode() for i in range(4)]
    lines.insert(2, b'{"image": "a.png", "caption": "caf\xe9 latin-1"}')
    (tmp_path / "t.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    csv_rows = [b"image,caption"] + [f"a.png,row {i}".encode() for i in range(4)]
    csv_rows.insert(3, b"a.png,caf\xe9 latin-1")
    (tmp_path / "t.csv").write_bytes(b"\r\n".join(csv_rows) + b"\r\n")
    for table in ("t.jsonl", "t.csv"):
        out = tmp_path / table.replace(".", "_")
        pairs.main(
            ["--table", str(tmp_path / table), "--image-root", str(tmp_path)] + ["--out", str(out)]
        )
        s = summary(out, "pairs")
        assert s["samples_written"] == 4 and s["skipped"] == {"bad_encoding": 1}, table
        assert captions_of(out) == [f"row {i}" for i in range(4)]


def test_a_caption_file_that_is_not_utf8_is_skipped_not_mangled(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name, caption in [("good", b"a red square"), ("bad", b"caf\xe9")]:
        (src / f"{name}.png").write_bytes(solid(RED))
        (src / f"{name}.txt").write_bytes(caption)
    pairs.main(["--folder", str(src), "--out", str(tmp_path / "out")])
    assert summary(tmp_path / "out", "pairs")["skipped"] == {"bad_encoding": 1}
    assert captions_of(tmp_path / "out") == ["a red square"]


# -- MMC4 documents ----------------------------------------------------------------------------


def mmc4_doc(**changes):
    doc = {
        "text_list": ["a red square.", "a blue square."],
        "image_info": [
            {"image_name": "red.png", "matched_text_index": 0, "matched_sim": 0.3},
            {"image_name": "blue.png", "matched_text_index": 1, "matched_sim": 0.3},
        ],
        "similarity_matrix": [[0.3, 0.1], [0.1, 0.3]],
    }
    doc.update(changes)
    return doc


def run_mmc4(tmp_path, docs, raw_lines=()):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    (tmp_path / "imgs" / "red.png").write_bytes(solid(RED))
    (tmp_path / "imgs" / "blue.png").write_bytes(solid(BLUE))
    lines = [json.dumps(d).encode() for d in docs] + list(raw_lines)
    (tmp_path / "docs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    interleaved.main(
        ["mmc4", "--jsonl", str(tmp_path / "docs.jsonl"), "--images", str(tmp_path / "imgs")]
        + ["--out", str(out), "--max-skip-ratio", "1"]  # these tests count the skips
    )
    return summary(out, "mmc4"), shard_samples(out, "mmc4")


def test_malformed_mmc4_documents_are_skipped_and_counted(tmp_path):
    info = mmc4_doc()["image_info"]
    bad = [
        mmc4_doc(image_info=["red.png", info[1]]),  # an entry that is a string
        mmc4_doc(similarity_matrix=[[0.3, None], [0.1, 0.3]]),  # a null similarity
        mmc4_doc(similarity_matrix=None, image_info=[{**info[0], "matched_sim": "0.3"}]),
        mmc4_doc(text_list="one long string"),
        mmc4_doc(similarity_matrix=[[0.3, 0.1]]),  # one row for two images
    ]
    s, samples = run_mmc4(
        tmp_path, [mmc4_doc()] + bad + [mmc4_doc()], raw_lines=[b'{"text_list": ["caf\xe9"]}']
    )
    assert s["samples_written"] == 2
    assert s["skipped"] == {"bad_record": len(bad), "bad_encoding": 1}


def test_an_image_matched_past_text_list_is_counted(tmp_path):
    info = mmc4_doc()["image_info"]
    past_matrix = mmc4_doc(similarity_matrix=[[0.3, 0.1, 0.9], [0.1, 0.3, 0.1]])
    past_index = mmc4_doc(
        similarity_matrix=None, image_info=[info[0], {**info[1], "matched_text_index": 5}]
    )
    s, samples = run_mmc4(tmp_path, [past_matrix, past_index, mmc4_doc()])
    assert s["samples_written"] == 1 and s["skipped"] == {"bad_record": 2}
    images = [k for k in samples[0] if k.startswith("img")]
    assert len(images) == 2  # the good document keeps both images


# -- keys ----------------------------------------------------------------------------------------


def test_folder_files_that_would_share_a_key_all_arrive(tmp_path, processor):
    src = tmp_path / "src"
    src.mkdir()
    names = {"cat.jpg": "jpeg cat", "cat.png": "png cat", "a.b.png": "dotted", "a_b.png": "under"}
    for name, caption in names.items():
        image = Image.new("RGB", (24, 16), RED)
        buf = io.BytesIO()
        image.save(buf, "JPEG" if name.endswith("jpg") else "PNG")
        (src / name).write_bytes(buf.getvalue())
        (src / name).with_suffix(".txt").write_text(caption)
    # cat.jpg and cat.png share cat.txt: both captions are the last one written ("png cat")
    (src / "zz.png").write_bytes(solid(BLUE))
    (src / "zz.txt").write_text("after them")
    out = tmp_path / "out"
    pairs.main(["--folder", str(src), "--out", str(out)])
    samples = shard_samples(out, "pairs")
    assert len({s["__key__"] for s in samples}) == len(samples) == 5
    data = loader(processor, "pairs", str(out / "pairs-00000.tar"), batch_size=1)
    assert len(list(data)) == 5 and data.stats()["ok"] == 5


def test_a_sample_key_is_never_written_twice_into_a_shard(tmp_path):
    from flamingo.data.writing import write_shards

    samples = [encode_pair(k, solid(RED), "png", k) for k in ("a", "b", "a", "c")]
    s = write_shards(samples, lambda x: x, tmp_path, "dup", items_per_shard=10)
    assert s.samples_written == 3 and s.skipped == {"duplicate_key": 1}
    assert [x["__key__"] for x in shard_samples(tmp_path, "dup")] == ["a", "b", "c"]


# -- marker strings in data ------------------------------------------------------------------------


def test_marker_strings_in_captions_never_become_special_tokens(tmp_path, processor, cfg):
    from flamingo import Flamingo

    tricky = "<ima<image>ge> a <PAD> b <|endoftext|> c <|endof<|endofchunk|>chunk|>"
    shards = write(tmp_path, [encode_pair("k", solid(RED), "png", tricky)], "m")
    data = loader(processor, "pairs", shards, batch_size=1, p_leading_space=0.0)
    batch = next(iter(data))
    ids = real_ids(batch, 0)
    special = processor.special_tokens
    assert ids.count(special.image_id) == 1 and ids[0] == special.image_id
    assert special.pad_id not in ids
    eos = processor.tokenizer.eos_token_id
    assert ids.count(eos) == 1 and ids[-1] == eos
    assert data.stats()["text_markers_removed"] == 1
    model = Flamingo.from_config(cfg).eval()
    out = model(
        batch["input_ids"],
        batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        media_slots=batch["media_slots"],
    )
    assert out.logits.shape[1] == batch["input_ids"].shape[1]


def test_marker_strings_in_documents_never_become_markers(tmp_path, processor):
    doc = encode_interleaved(
        "d", ["intro <ima<image>ge>", (solid(RED), "png"), "red <image> square"]
    )
    data = loader(
        processor,
        "interleaved",
        write(tmp_path, [doc], "m"),
        batch_size=1,
        seq_len=64,
        p_next_image=0.0,
    )
    batch = next(iter(data))
    assert real_ids(batch, 0).count(processor.special_tokens.image_id) == 1
    assert batch["pixel_values"].shape[0] == 1 == batch["media_slots"].shape[1]


# -- images --------------------------------------------------------------------------------------


def rotated_jpeg(orientation: int) -> bytes:
    """A 30x20 image stored sideways: red left half, blue right half once upright."""
    upright = Image.new("RGB", (30, 20), BLUE)
    upright.paste(RED, (0, 0, 15, 20))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what orientation 6 undoes
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


def test_exif_orientation_is_applied(tmp_path, processor):
    image, _ = decode_image(rotated_jpeg(6), 10**6)
    assert image.size == (30, 20)
    assert near(image.getpixel((3, 10)), RED, tol=12) and near(
        image.getpixel((26, 10)), BLUE, tol=12
    )
    shards = write(tmp_path, [encode_pair("photo", rotated_jpeg(6), "jpg", "a photo")], "exif")
    data = loader(processor, "pairs", shards, batch_size=1)
    pixels = next(iter(data))["pixel_values"][0, 0]
    size = pixels.shape[-1]
    left = pixels[:, :, : size // 4]
    assert near(pixel_colour(left, processor), RED, tol=12)
    assert data.stats()["image_exif_rotated"] == 1


# -- tars ----------------------------------------------------------------------------------------


def pairs_tar(path, keys):
    with TarWriter(str(path), encoder=False) as w:
        for i, key in enumerate(keys):
            w.write({"__key__": key, "jpg": solid((i * 40, 0, 0)), "txt": f"photo {key}".encode()})
    return path.read_bytes()


def cut_inside_last_sample(raw: bytes, last_key: str) -> bytes:
    """Cut the tar inside the data of the last sample's first member."""
    header = raw.rindex(f"{last_key}.jpg".encode())
    return raw[: (header // 512 + 1) * 512 + 100]


def test_a_truncated_tar_keeps_every_sample_before_the_cut(tmp_path, processor):
    raw = pairs_tar(tmp_path / "full.tar", ["k0", "k1", "k2"])
    (tmp_path / "cut.tar").write_bytes(cut_inside_last_sample(raw, "k2"))
    data = loader(processor, "pairs", str(tmp_path / "cut.tar"), batch_size=1)
    assert [b["keys"][0] for b in data] == ["k0", "k1"]
    stats = data.stats()
    assert stats["shard_error"] == 1 and stats["skip/truncated_sample"] == 1


def test_a_tar_cut_between_members_is_reported_not_taken_for_its_end(tmp_path, processor):
    raw = pairs_tar(tmp_path / "full.tar", ["k0", "k1"])
    end_of_k1_txt = raw.rindex(b"photo k1") + len(b"photo k1")
    (tmp_path / "cut.tar").write_bytes(raw[: (end_of_k1_txt // 512 + 1) * 512])
    data = loader(processor, "pairs", str(tmp_path / "cut.tar"), batch_size=1)
    # k1 might have had more members after the cut: it is not used, and the damage is counted
    assert [b["keys"][0] for b in data] == ["k0"]
    assert data.stats()["shard_error"] == 1


def test_img2dataset_goes_on_past_a_truncated_input_tar(tmp_path):
    raw = pairs_tar(tmp_path / "full.tar", ["000", "001", "002"])
    (tmp_path / "in-00000.tar").write_bytes(cut_inside_last_sample(raw, "002"))
    pairs_tar(tmp_path / "in-00001.tar", ["100", "101"])
    out = tmp_path / "out"
    pairs.main(["--img2dataset", f"{tmp_path}/in-{{00000..00001}}.tar", "--out", str(out)])
    s = summary(out, "pairs")
    assert s["samples_written"] == 4 and s["skipped"] == {"truncated_input": 1}
    assert s["events"] == {"input_tar_damaged": 1}
    assert captions_of(out) == [f"photo {k}" for k in ("000", "001", "100", "101")]
    assert not list(out.glob("*.tmp"))


def test_video_clips_that_would_share_a_key_all_arrive(tmp_path):
    frames = tmp_path / "frames"
    for name in ("a.b", "a_b"):
        (frames / name).mkdir(parents=True)
        for i in range(2):
            (frames / name / f"{i}.png").write_bytes(solid(RED))
        (frames / name / "caption.txt").write_text(f"clip {name}")
    (tmp_path / "caps.jsonl").write_bytes(b'{"video": "x", "caption": "caf\xe9"}\n')
    out = tmp_path / "out"
    video.main(
        [
            "--frames",
            str(frames),
            "--num-frames",
            "2",
            "--captions",
            str(tmp_path / "caps.jsonl"),
            "--out",
            str(out),
        ]
    )
    samples = shard_samples(out, "video")
    assert len({s["__key__"] for s in samples}) == 2
    assert summary(out, "video")["events"] == {"caption_rows_unusable": 1}


@pytest.mark.parametrize("resize", ["pad", "crop", "squash"])
def test_an_image_without_pixels_is_refused_by_name(resize):
    """A 0x0 image raised ZeroDivisionError deep in the pad resize."""
    from flamingo.config import VisionConfig
    from flamingo.vision import square

    with pytest.raises(ValueError, match="0x0 image"):
        square(Image.new("RGB", (0, 0)), VisionConfig(resize=resize, pretrained=None))


def test_a_conversion_that_skips_most_items_fails_and_says_why(tmp_path, capsys):
    """It exited 0 with a near-empty corpus (a wrong image root looks like this): now status 3
    above --max-skip-ratio, the shards and summary written all the same; 1 accepts it."""
    (tmp_path / "a.png").write_bytes(solid(RED))
    rows = [{"image": "a.png", "caption": "kept"}] + [
        {"image": f"missing-{i}.png", "caption": "lost"} for i in range(3)
    ]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--table", str(tmp_path / "t.jsonl"), "--image-root", str(tmp_path)]
    with pytest.raises(SystemExit) as ended:
        pairs.main([*args, "--out", str(tmp_path / "out")])
    assert ended.value.code == 3
    captured = capsys.readouterr()
    assert "3 of 4 items were skipped (75%" in captured.err
    # the skipped items are named, not only counted: in the error, the report and the summary
    assert "(e.g. item 1: missing_image:" in captured.err and "missing-0.png" in captured.err
    assert "e.g. item 2: missing_image:" in captured.out
    examples = summary(tmp_path / "out", "pairs")["skipped_examples"]["missing_image"]
    assert len(examples) == 3 and "missing-2.png" in examples[2]
    assert summary(tmp_path / "out", "pairs")["samples_written"] == 1  # written all the same
    pairs.main([*args, "--out", str(tmp_path / "ok"), "--max-skip-ratio", "1"])
    assert summary(tmp_path / "ok", "pairs")["skipped"] == {"missing_image": 3}
