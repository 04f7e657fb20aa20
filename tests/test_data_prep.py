"""Converters: each source format -> shards the loaders read, with bad input counted."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from webdataset import TarWriter

from data_prep import interleaved, pairs, video
from data_prep.interleaved import assign_images
from flamingo.data.shards import read_shard
from tests.helpers import padded
from tests.test_data import COLOURS, loader, near, pixel_colour, real_ids, solid


def shard_samples(out, prefix):
    return [s for p in sorted(out.glob(f"{prefix}-*.tar")) for s in read_shard(str(p))]


def summary(out, prefix):
    return json.loads((out / f"{prefix}-summary.json").read_text())


@pytest.mark.parametrize("module", [pairs, interleaved, video])
def test_cli_help(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0 and "usage: python -m data_prep." in capsys.readouterr().out


def test_pairs_from_a_folder(tmp_path, processor):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i, colour in enumerate(COLOURS[:3]):
        (src / "sub" / f"img{i}.png").write_bytes(solid(colour))
        (src / "sub" / f"img{i}.txt").write_text(f"caption {i}\n")
    (src / "nocap.png").write_bytes(solid((1, 1, 1)))
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (src / "broken.txt").write_text("never used")
    pairs.main(["--folder", str(src), "--out", str(tmp_path / "out"), "--items-per-shard", "2"])
    s = summary(tmp_path / "out", "pairs")
    assert s["samples_written"] == 3 and s["skipped"] == {"missing_key": 1, "image_decode_error": 1}
    batches = list(
        loader(processor, "pairs", f"{tmp_path}/out/pairs-{{00000..00002}}.tar", batch_size=1)
    )
    captions = sorted(processor.tokenizer.decode(real_ids(b, 0)[1:-2]).strip() for b in batches)
    assert captions == ["caption 0", "caption 1", "caption 2"]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_pairs_from_a_table(tmp_path, fmt):
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(4):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(solid(COLOURS[i]))
        rows.append({"image": f"{i}.png", "caption": f"shape {i}", "url": f"http://x/{i}"})
    rows.append({"image": "missing.png", "caption": "gone", "url": "u"})
    rows.append({"image": "0.png", "caption": "", "url": "u"})
    table = tmp_path / f"t.{fmt}"
    if fmt == "jsonl":
        table.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken json\n")
    elif fmt == "csv":
        table.write_text(
            "image,caption,url\n"
            + "".join(f"{r['image']},{r['caption']},{r['url']}\n" for r in rows)
        )
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), table)
    pairs.main(
        [
            "--table",
            str(table),
            "--image-root",
            str(tmp_path / "imgs"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    s = summary(tmp_path / "out", "pairs")
    assert s["samples_written"] == 4
    assert s["skipped"]["missing_image"] == 1 and s["skipped"]["empty_text"] == 1
    assert s["skipped"].get("bad_json", 0) == (1 if fmt == "jsonl" else 0)
    samples = shard_samples(tmp_path / "out", "pairs")
    assert [x["txt"].decode() for x in samples] == [f"shape {i}" for i in range(4)]
    assert json.loads(samples[0]["json"])["url"] == "http://x/0"


def test_pairs_from_img2dataset_shards(tmp_path):
    src = tmp_path / "in-00000.tar"
    with TarWriter(str(src), encoder=False) as w:
        for i in range(3):
            w.write(
                {
                    "__key__": f"{i:09d}",
                    "jpg": solid(COLOURS[i]),
                    "txt": f"photo {i}".encode(),
                    "json": b'{"url": "u"}',
                }
            )
        w.write({"__key__": "000000009", "txt": b"no image"})
    pairs.main(["--img2dataset", str(src), "--out", str(tmp_path / "out")])
    s = summary(tmp_path / "out", "pairs")
    assert s["samples_written"] == 3 and s["skipped"] == {"missing_key": 1}


def test_greedy_one_to_one_assignment_with_threshold():
    sim = [
        [0.9, 0.5, 0.1],  # image 0 best matches sentence 0
        [0.8, 0.3, 0.1],  # image 1 also prefers sentence 0 -> gets sentence 1? no: 0.3 < 0.5
        [0.1, 0.1, 0.2],  # below threshold everywhere
    ]
    assert assign_images(sim, 0.24) == {0: 0, 1: 1}


def test_mmc4_documents_keep_image_order_with_markers(tmp_path, processor):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name, colour in [("a.png", COLOURS[0]), ("b.png", COLOURS[1]), ("c.png", COLOURS[2])]:
        (imgs / name).write_bytes(solid(colour))
    docs = [
        {  # image b (listed first) matches the LAST sentence; a matches the first; c unmatched
            "text_list": ["first sentence", "middle sentence", "last sentence"],
            "image_info": [
                {"image_name": "b.png"},
                {"image_name": "a.png"},
                {"image_name": "c.png"},
            ],
            "similarity_matrix": [[0.3, 0.2, 0.35], [0.31, 0.1, 0.1], [0.1, 0.1, 0.1]],
            "url": "http://doc/0",
        },
        {
            "text_list": ["x"],
            "image_info": [
                {"image_name": "missing.png", "matched_text_index": 0, "matched_sim": 0.5}
            ],
        },
        {"text_list": ["y"], "image_info": []},
    ]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    interleaved.main(
        [
            "mmc4",
            "--max-skip-ratio",
            "1",
            "--jsonl",
            str(tmp_path / "docs.jsonl"),
            "--images",
            str(imgs),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    s = summary(tmp_path / "out", "mmc4")
    assert s["samples_written"] == 1 and s["skipped"] == {"no_images": 2}
    assert s["events"]["image_dropped/missing_image"] == 1
    assert s["events"]["image_below_threshold_or_unmatched"] == 1
    (batch,) = list(
        loader(
            processor,
            "interleaved",
            f"{tmp_path}/out/mmc4-00000.tar",
            batch_size=1,
            seq_len=128,
            p_next_image=0.0,
        )
    )
    text = processor.decode(real_ids(batch, 0))
    assert text.startswith(
        "<image>first sentence middle sentence<|endofchunk|><image>last sentence<|endofchunk|>"
    )
    assert near(pixel_colour(padded(batch)[0, 0, 0], processor), COLOURS[0])  # a, at sentence 0
    assert near(pixel_colour(padded(batch)[0, 1, 0], processor), COLOURS[1])  # b, at sentence 2


def test_obelics_parquet(tmp_path, processor):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes(solid(COLOURS[3]))
    rows = [
        {
            "texts": ["intro", None, "after", None],
            "images": [None, "x.png", None, "http://remote/img.jpg"],
        },
        {"texts": [None, "only"], "images": ["nope.png", None]},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "o.parquet")
    interleaved.main(
        [
            "obelics",
            "--parquet",
            str(tmp_path / "o.parquet"),
            "--images",
            str(tmp_path / "imgs"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    s = summary(tmp_path / "out", "obelics")
    assert s["samples_written"] == 1 and s["skipped"] == {"no_images": 1}
    assert s["events"]["image_dropped/missing_image"] == 2
    (batch,) = list(
        loader(
            processor,
            "interleaved",
            f"{tmp_path}/out/obelics-00000.tar",
            batch_size=1,
            seq_len=64,
            p_next_image=0.0,
        )
    )
    assert processor.decode(real_ids(batch, 0)).startswith("intro<image>after<|endofchunk|>")


def write_video(path, colours, size=32):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for colour in colours:
            frame = av.VideoFrame.from_image(Image.new("RGB", (size, size), colour))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_files_and_frame_folders(tmp_path, processor):
    vids = tmp_path / "vids"
    vids.mkdir()
    colours = [(250, 0, 0)] * 3 + [(0, 250, 0)] * 3 + [(0, 0, 250)] * 3
    write_video(vids / "clip.mp4", colours)
    (vids / "clip.txt").write_text("a colour changing clip")
    write_video(vids / "short.mp4", colours[:2])
    (vids / "short.txt").write_text("too short")
    (vids / "broken.mp4").write_bytes(b"not a video")
    (vids / "broken.txt").write_text("broken")
    video.main(
        [
            "--max-skip-ratio",
            "1",
            "--videos",
            str(vids),
            "--num-frames",
            "3",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    s = summary(tmp_path / "out", "video")
    assert s["samples_written"] == 1
    assert s["skipped"] == {"too_few_frames": 1, "video_decode_error": 1}
    (batch,) = list(
        loader(processor, "video", f"{tmp_path}/out/video-00000.tar", batch_size=1, num_frames=3)
    )
    got = [pixel_colour(padded(batch)[0, 0, f], processor) for f in range(3)]
    assert all(
        near(g, e, tol=30)
        for g, e in zip(got, [(250, 0, 0), (0, 250, 0), (0, 0, 250)], strict=True)
    )

    frames = tmp_path / "frames" / "clip1"
    frames.mkdir(parents=True)
    for i, colour in enumerate(COLOURS[:5]):
        (frames / f"{i:03d}.png").write_bytes(solid(colour))
    (frames / "caption.txt").write_text("five frames")
    video.main(
        [
            "--max-skip-ratio",
            "1",
            "--frames",
            str(tmp_path / "frames"),
            "--num-frames",
            "3",
            "--out",
            str(tmp_path / "out2"),
        ]
    )
    samples = shard_samples(tmp_path / "out2", "video")
    assert len(samples) == 1 and sorted(k for k in samples[0] if k.startswith("frame")) == [
        "frame0000.jpg",
        "frame0001.jpg",
        "frame0002.jpg",
    ]
