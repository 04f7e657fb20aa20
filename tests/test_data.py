"""Data: shard round trips per kind, bad input, determinism, resume, splitting."""

from __future__ import annotations

import io
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flamingo.data.config import DatasetConfig
from flamingo.data.pipeline import FlamingoLoader
from flamingo.data.preprocess import Preprocessor, strip_markers
from flamingo.data.schema import encode_interleaved, encode_pair, encode_video
from flamingo.data.shards import read_shard
from flamingo.data.writing import write_shards
from tests.helpers import padded

COLOURS = [
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (0, 255, 255),
    (255, 0, 255),
    (128, 128, 128),
    (255, 128, 0),
]


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def solid(colour, size=(24, 16), mode="RGB") -> bytes:
    return encode(Image.new(mode, size, colour))


def write(tmp_path: Path, samples: list[dict], prefix: str, per_shard: int = 1000) -> str:
    write_shards(samples, lambda s: s, tmp_path, prefix, items_per_shard=per_shard)
    shards = sorted(tmp_path.glob(f"{prefix}-*.tar"))
    return f"{tmp_path}/{prefix}-{{00000..{len(shards) - 1:05d}}}.tar"


def loader(processor, kind, shards, seed=0, num_workers=0, **kw) -> FlamingoLoader:
    defaults = dict(batch_size=4, seq_len=32, p_flip=0.0, resampled=False, shuffle_buffer=0)
    cfg = DatasetConfig(name=kind, kind=kind, shards=shards, **{**defaults, **kw})
    return FlamingoLoader.from_processor(cfg, processor, seed=seed, num_workers=num_workers)


def pixel_colour(pixels: torch.Tensor, processor) -> tuple[int, int, int]:
    """Colour at the centre of a (C, H, W) image: uint8 (the loader's) or normalised."""
    if pixels.dtype == torch.uint8:
        h, w = pixels.shape[1:]
        return tuple(int(v) for v in pixels[:, h // 2, w // 2])
    mean = torch.tensor(processor.vision_cfg.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.vision_cfg.image_std).view(3, 1, 1)
    rgb = ((pixels * std + mean) * 255).round()
    h, w = rgb.shape[1:]
    return tuple(int(v) for v in rgb[:, h // 2, w // 2])


def near(a, b, tol=3) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def real_ids(batch, row) -> list[int]:
    return batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()


# -- round trips ----------------------------------------------------------------------------------


def test_pairs_round_trip(tmp_path, processor):
    samples = [
        encode_pair(f"s{i}", solid(COLOURS[i % 8]), "png", f"a shape number {i}", {"i": i})
        for i in range(10)
    ]
    shards = write(tmp_path, samples, "pairs", per_shard=4)
    batches = list(loader(processor, "pairs", shards))
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(f"s{i}" for i in range(10))
    special = processor.special_tokens
    for batch in batches:
        assert padded(batch).shape[1:] == (1, 1, 3, 32, 32)
        for row, key in enumerate(batch["keys"]):
            ids = real_ids(batch, row)
            i = int(key[1:])
            assert ids[0] == special.image_id and ids[-2:] == [
                special.end_of_chunk_id,
                processor.tokenizer.eos_token_id,
            ]
            assert processor.tokenizer.decode(ids[1:-2]).strip() == f"a shape number {i}"
            assert near(pixel_colour(padded(batch)[row, 0, 0], processor), COLOURS[i % 8])


def doc(i: int, n_images: int, text_words: int = 3) -> dict:
    chunks: list = [f"intro {i}"]
    for k in range(n_images):
        chunks.append((solid(COLOURS[k % 8]), "png"))
        chunks.append(" ".join(f"w{k}" for _ in range(text_words)))
    return encode_interleaved(f"d{i}", chunks, {"url": f"http://x/{i}"})


def test_interleaved_round_trip_keeps_image_order(tmp_path, processor):
    shards = write(tmp_path, [doc(i, 3) for i in range(6)], "doc")
    batches = list(loader(processor, "interleaved", shards, seq_len=256, p_next_image=0.0))
    special = processor.special_tokens
    rows = 0
    for batch in batches:
        for row in range(len(batch["keys"])):
            ids = real_ids(batch, row)
            assert ids.count(special.image_id) == 3 == padded(batch).shape[1]
            for k in range(3):  # image k is image k of the document, before its text "wk wk wk"
                assert near(pixel_colour(padded(batch)[row, k, 0], processor), COLOURS[k])
            text = processor.decode(ids)
            assert text.startswith(
                f"intro {batch['keys'][row][1:]}<image>w0 w0 w0<|endofchunk|><image>w1"
            )
            rows += 1
    assert rows == 6


def test_render_ties_text_to_previous_or_next_image():
    a, b = object(), object()
    chunks = ["t0", a, "t1", b, "t2"]
    assert (
        Preprocessor._render(chunks, tie_next=False)
        == "t0<image>t1<|endofchunk|><image>t2<|endofchunk|>"
    )
    assert (
        Preprocessor._render(chunks, tie_next=True)
        == "<image>t0<|endofchunk|><image>t1<|endofchunk|> t2"
    )
    assert strip_markers("a <image> b<|endofchunk|>") == "a  b"
    assert strip_markers("<ima<image>ge> x <|endof<|endofchunk|>chunk|>") == " x "


def test_window_keeps_at_most_max_images_and_only_their_pixels(tmp_path, processor):
    shards = write(tmp_path, [doc(i, 8, text_words=2) for i in range(4)], "long")
    batches = list(loader(processor, "interleaved", shards, seq_len=40, max_images=5, seed=3))
    special = processor.special_tokens
    for batch in batches:
        assert batch["input_ids"].shape[1] <= 40
        for row in range(len(batch["keys"])):
            markers = real_ids(batch, row).count(special.image_id)
            assert 1 <= markers <= 5
            assert padded(batch)[row, markers:].abs().sum() == 0  # nothing beyond them
            assert padded(batch)[row, :markers].abs().flatten(1).sum(-1).gt(0).all()
        # no padding image is shipped: one flat item per <image> of the batch
        assert batch["pixel_values"].shape[0] == (batch["input_ids"] == special.image_id).sum()


def test_video_round_trip_samples_frames_evenly(tmp_path, processor):
    frames = [solid(c) for c in COLOURS]  # 8 stored frames
    samples = [encode_video(f"v{i}", frames, "png", f"a clip {i}") for i in range(4)]
    shards = write(tmp_path, samples, "vid")
    (batch,) = list(loader(processor, "video", shards, num_frames=4))
    assert padded(batch).shape == (4, 1, 4, 3, 32, 32)
    got = [pixel_colour(padded(batch)[0, 0, f], processor) for f in range(4)]
    expected = [COLOURS[i] for i in (0, 2, 5, 7)]  # round(i * 7 / 3)
    assert all(near(g, e) for g, e in zip(got, expected, strict=True))


# -- bad input ---------------------------------------------------------------------------------


def bad_image_cases() -> dict[str, bytes]:
    jpeg = encode(Image.new("RGB", (64, 64), (200, 10, 10)), "JPEG")
    sixteen = Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16))
    palette = Image.new("P", (16, 16))
    palette.putpalette([10, 200, 10] * 256)
    return {
        "truncated": jpeg[: len(jpeg) // 2],
        "corrupt": b"\x89PNG\r\n\x1a\nthis is not a png",
        "cmyk": encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"),
        "sixteen": encode(sixteen),
        "palette": encode(palette),
        "rgba": encode(Image.new("RGBA", (16, 16), (0, 0, 255, 255))),
        "gray": encode(Image.new("L", (16, 16), 128)),
        "bomb": encode(Image.new("RGB", (300, 300), (1, 2, 3))),
    }


def test_bad_pairs_are_skipped_and_counted(tmp_path, processor):
    cases = bad_image_cases()
    samples = [encode_pair("good0", solid((255, 0, 0)), "png", "good zero")]
    samples += [encode_pair(name, data, "png", f"case {name}") for name, data in cases.items()]
    samples += [
        {"__key__": "nocaption", "png": solid((1, 1, 1))},
        {"__key__": "noimage", "txt": b"text only"},
        encode_pair("empty", solid((1, 1, 1)), "png", "   "),
        encode_pair("long", solid((1, 1, 1)), "png", "x" * 500),
        encode_pair("good1", solid((0, 255, 0)), "png", "good one"),
    ]
    shards = write(tmp_path, samples, "bad")
    (tmp_path / "broken-00000.tar").write_bytes(b"not a tar file at all")
    spec = shards + f"::{tmp_path}/broken-00000.tar"
    data = loader(
        processor,
        "pairs",
        spec,
        batch_size=1,
        max_text_chars=200,
        max_image_pixels=50_000,
        min_samples_for_skip_rate=1000,
    )
    keys = [k for b in data for k in b["keys"]]
    stats = data.stats()
    assert sorted(keys) == sorted(["good0", "good1", "cmyk", "sixteen", "palette", "rgba", "gray"])
    assert stats["skip/image_decode_error"] == 2  # truncated, corrupt
    assert stats["skip/image_too_large"] == 1
    assert stats["skip/missing_key"] == 2
    assert stats["skip/empty_text"] == 1
    assert stats["skip/text_too_long"] == 1
    assert stats["shard_error"] == 1
    # Pillow 10.1 opens a 16-bit PNG as "I" (32-bit), newer ones (13) as "I;16"
    sixteen = Image.open(io.BytesIO(bad_image_cases()["sixteen"])).mode
    for mode in ("CMYK", sixteen, "P", "RGBA", "L"):
        assert stats[f"image_mode/{mode}"] == 1, mode


def test_converted_modes_keep_their_colours(tmp_path, processor):
    cases = bad_image_cases()
    expected = {
        "cmyk": (255, 0, 0),
        "palette": (10, 200, 10),
        "rgba": (0, 0, 255),
        "gray": (128, 128, 128),
        "sixteen": (156, 156, 156),
    }
    samples = [encode_pair(n, cases[n], "png", n) for n in expected]
    batches = list(loader(processor, "pairs", write(tmp_path, samples, "modes"), batch_size=1))
    for batch in batches:
        name = batch["keys"][0]
        assert near(pixel_colour(padded(batch)[0, 0, 0], processor), expected[name], tol=6), name


def test_bad_interleaved_documents(tmp_path, processor):
    good = doc(0, 2)
    one_bad = encode_interleaved(
        "onebad",
        [
            "before",
            (solid((255, 0, 0)), "png"),
            "red",
            (b"garbage", "png"),
            "lost",
            (solid((0, 0, 255)), "png"),
            "blue",
        ],
    )
    samples = [
        good,
        one_bad,
        encode_interleaved("noimages", ["just text", "more text"]),
        encode_interleaved("allbad", ["t", (b"junk", "png"), "u"]),
        {"__key__": "badjson", "json": b"{not json", "img0.png": solid((1, 2, 3))},
        {"__key__": "nochunks", "json": b'{"texts": []}'},
        encode_interleaved("toolong", ["y" * 500, (solid((1, 1, 1)), "png")]),
    ]
    data = loader(
        processor,
        "interleaved",
        write(tmp_path, samples, "bad"),
        batch_size=1,
        seq_len=128,
        max_text_chars=200,
        p_next_image=0.0,
    )
    batches = {b["keys"][0]: b for b in data}
    stats = data.stats()
    assert set(batches) == {"d0", "onebad"}
    assert stats["image_dropped/image_decode_error"] == 2  # one in onebad, one in allbad
    assert stats["skip/no_images"] == 2 and stats["skip/bad_json"] == 1
    assert stats["skip/missing_key"] == 1 and stats["skip/text_too_long"] == 1
    b = batches["onebad"]
    text = processor.decode(real_ids(b, 0))
    # the bad image went with its marker: its text now belongs to the previous (red) image
    assert text.startswith("before<image>red lost<|endofchunk|><image>blue<|endofchunk|>")
    assert padded(b).shape[1] == 2
    assert near(pixel_colour(padded(b)[0, 0, 0], processor), (255, 0, 0))
    assert near(pixel_colour(padded(b)[0, 1, 0], processor), (0, 0, 255))


def test_mostly_broken_data_aborts_naming_the_shard(tmp_path, processor):
    samples = [encode_pair(f"b{i}", b"junk", "png", "x") for i in range(20)] + [
        encode_pair("ok", solid((1, 1, 1)), "png", "y")
    ]
    shards = write(tmp_path, samples, "junk")
    data = loader(processor, "pairs", shards, max_skip_rate=0.3, min_samples_for_skip_rate=10)
    with pytest.raises(RuntimeError, match=r"junk-00000\.tar.*image_decode_error"):
        list(data)


# -- determinism, resume, splitting --------------------------------------------------------------------


def many_pairs(tmp_path, n=48, per_shard=6) -> str:
    rng = random.Random(0)
    samples = [
        encode_pair(
            f"p{i}",
            solid(COLOURS[rng.randrange(8)], (rng.randint(8, 40), rng.randint(8, 40))),
            "png",
            f"caption {i}",
        )
        for i in range(n)
    ]
    return write(tmp_path, samples, "many", per_shard=per_shard)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def same(a, b) -> bool:
    return (
        a["keys"] == b["keys"]
        and torch.equal(a["input_ids"], b["input_ids"])
        and torch.equal(a["pixel_values"], b["pixel_values"])
        and torch.equal(a["media_slots"], b["media_slots"])
    )


@pytest.mark.parametrize("resampled", [True, False])
def test_deterministic_given_a_seed(tmp_path, processor, resampled):
    shards = many_pairs(tmp_path)
    kw = dict(resampled=resampled, shuffle_buffer=4, p_flip=0.5, p_leading_space=0.5)
    a = take(iter(loader(processor, "pairs", shards, seed=1, **kw)), 6)
    b = take(iter(loader(processor, "pairs", shards, seed=1, **kw)), 6)
    c = take(iter(loader(processor, "pairs", shards, seed=2, **kw)), 6)
    assert all(same(x, y) for x, y in zip(a, b, strict=True))
    assert not all(same(x, y) for x, y in zip(a, c, strict=True))
    # where the shards live does not matter: the same files elsewhere give the same batches
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for tar in tmp_path.glob("*.tar"):
        shutil.copy(tar, moved / tar.name)
    d = take(
        iter(loader(processor, "pairs", shards.replace(str(tmp_path), str(moved)), seed=1, **kw)), 6
    )
    assert all(same(x, y) for x, y in zip(a, d, strict=True))


@pytest.mark.parametrize(("resampled", "num_workers"), [(True, 2), (False, 2), (True, 0)])
def test_resume_gives_the_uninterrupted_batches(tmp_path, processor, resampled, num_workers):
    shards = many_pairs(tmp_path)
    kw = dict(
        resampled=resampled,
        shuffle_buffer=4,
        p_flip=0.5,
        num_workers=num_workers,
        seed=5,
        batch_size=5,
    )
    full = take(iter(loader(processor, "pairs", shards, **kw)), 8)
    first = loader(processor, "pairs", shards, **kw)
    head = take(iter(first), 3)
    state = first.state_dict()
    restored = loader(processor, "pairs", shards, **kw)
    restored.load_state_dict(state)
    tail = take(iter(restored), 5)
    assert all(same(x, y) for x, y in zip(full, head + tail, strict=True))
    assert restored.stats()["ok"] >= first.stats()["ok"]


def test_split_by_worker_and_rank_is_disjoint(tmp_path, processor):
    shards = many_pairs(tmp_path, n=48, per_shard=6)  # 8 shards
    per_stream = []
    for rank in range(2):
        cfg = DatasetConfig(
            name="p", kind="pairs", shards=shards, batch_size=2, resampled=False, p_flip=0.0
        )
        data = FlamingoLoader.from_processor(cfg, processor, num_workers=2, rank=rank, world_size=2)
        keys = [k for b in data for k in b["keys"]]
        per_stream.append(keys)
    assert not set(per_stream[0]) & set(per_stream[1])
    assert sorted(per_stream[0] + per_stream[1]) == sorted(f"p{i}" for i in range(48))


def test_atomic_and_resumable_writing(tmp_path):
    calls = []

    def encode_or_die(i):
        calls.append(i)
        if i == 7:
            raise KeyboardInterrupt  # killed while writing shard 1
        return encode_pair(f"k{i}", b"x", "png", "c")

    with pytest.raises(KeyboardInterrupt):
        write_shards(range(12), encode_or_die, tmp_path, "w", items_per_shard=5)
    assert sorted(p.name for p in tmp_path.glob("w-*.tar")) == ["w-00000.tar"]
    calls.clear()
    summary = write_shards(
        range(12),
        lambda i: encode_pair(f"k{i}", b"x", "png", "c"),
        tmp_path,
        "w",
        items_per_shard=5,
    )
    assert summary.shards_reused == ["w-00000.tar"] and summary.samples_reused == 5
    assert len(summary.shards_written) == 2 and summary.samples_written == 7
    keys = [s["__key__"] for i in range(3) for s in read_shard(str(tmp_path / f"w-{i:05d}.tar"))]
    assert keys == [f"k{i}" for i in range(12)]


@pytest.mark.parametrize("resize", ["pad", "crop"])
def test_training_and_inference_resize_images_alike(processor, resize):
    from flamingo.data.images import ImagePreprocessor
    from flamingo.vision import image_transform, normalise

    cfg = processor.vision_cfg.replace(resize=resize)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)).resize((100, 60))
    train = ImagePreprocessor(cfg)(image)
    assert train.shape == (3, 32, 32) and train.dtype == torch.uint8
    # one resize, not two; the tower normalises the loader's uint8 to the inference values
    assert torch.equal(normalise(train, cfg), image_transform(cfg)(image))


@pytest.mark.parametrize("size", [(100, 60), (61, 97), (33, 32), (32, 32), (45, 45), (7, 300)])
def test_the_crop_is_open_clips_inference_preprocessing_to_the_pixel(processor, size):
    # OpenFlamingo evaluated with open_clip's transform: imported checkpoints see the same input
    import open_clip

    from flamingo.vision import image_transform

    cfg = processor.vision_cfg.replace(resize="crop")
    theirs = open_clip.image_transform(
        cfg.image_size, is_train=False, mean=cfg.image_mean, std=cfg.image_std
    )
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    assert torch.equal(image_transform(cfg)(image), theirs(image))


def test_a_pinned_loader_asks_the_data_loader_for_page_locked_batches(
    tmp_path, processor, monkeypatch
):
    # (pinning itself needs CUDA; here the request is checked, and that nothing else changes)
    import flamingo.data.pipeline as pipeline

    samples = [encode_pair(f"s{i}", solid(COLOURS[i]), "png", f"shape {i}", {}) for i in range(4)]
    shards = write(tmp_path, samples, "pairs", per_shard=4)
    asked = []
    real = pipeline.DataLoader

    def data_loader(*args, pin_memory, **kwargs):
        asked.append(pin_memory)
        return real(*args, **kwargs)  # unpinned: no CUDA here

    monkeypatch.setattr(pipeline, "DataLoader", data_loader)
    cfg = DatasetConfig(name="pairs", kind="pairs", shards=shards, resampled=False, p_flip=0.0)
    plain = list(FlamingoLoader.from_processor(cfg, processor, num_workers=0))
    pinned = list(FlamingoLoader.from_processor(cfg, processor, num_workers=0, pin_memory=True))
    assert asked == [False, True]
    assert [b["keys"] for b in plain] == [b["keys"] for b in pinned]


def test_the_loader_ships_uint8_pixels_the_tower_normalises_to_the_same_logits(tmp_path, processor):
    from flamingo.vision import normalise
    from tests.helpers import build, noise_image, set_gates

    pictures = [encode(noise_image(i, size=(40, 30))) for i in range(2)]
    samples = [encode_pair(f"s{i}", pictures[i], "png", f"a shape number {i}") for i in range(2)]
    batch = next(iter(loader(processor, "pairs", write(tmp_path, samples, "u8"), batch_size=2)))
    pixels = batch["pixel_values"]
    assert pixels.dtype == torch.uint8  # a quarter of float32's bytes to pin and copy
    model = build()
    set_gates(model)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        slots = batch["media_slots"]
        on_device = model(ids, mask, pixel_values=pixels, media_slots=slots).logits
        normalised = normalise(pixels, model.cfg.vision)
        normalised_first = model(ids, mask, pixel_values=normalised, media_slots=slots)
    assert torch.equal(on_device, normalised_first.logits)
