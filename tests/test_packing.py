"""Packed rows (flamingo/packing.py): several documents per row give each document the logits,
labels and loss it has alone, for every LM family in the table."""

from __future__ import annotations

import random

import pytest
import torch

from flamingo import Flamingo, FlamingoProcessor
from flamingo.lm import DECODER_LAYOUTS
from flamingo.losses import make_labels
from flamingo.media import media_slots
from flamingo.xattn import media_index_from_ids
from tests.helpers import noise_image, set_gates
from tests.test_lm_families import TINY_LMS, family_config

DOCS = [
    ("<image>a red circle<|endofchunk|>", [1]),
    ("some text first <image>then a blue square<|endofchunk|><image>and more", [2, 3]),
    ("a text-only document, with no image at all", []),
    ("<image>a green one<|endofchunk|>", [4]),
]
ROWS = [[0, 1], [2, 3]]  # which documents each packed row holds


def pack(processor: FlamingoProcessor, rows: list[list[int]]) -> dict:
    """The documents tokenized alone, then concatenated row by row (right-padded)."""
    ids = [processor.tokenizer(text, return_tensors="pt")["input_ids"][0] for text, _ in DOCS]
    width = max(sum(len(ids[d]) for d in row) for row in rows)
    pad = processor.special_tokens.pad_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    document_ids = torch.zeros_like(input_ids)
    mask = torch.zeros_like(input_ids)
    starts = {}
    for r, row in enumerate(rows):
        at = 0
        for k, d in enumerate(row):
            starts[d] = (r, at)
            input_ids[r, at : at + len(ids[d])] = ids[d]
            document_ids[r, at : at + len(ids[d])] = k
            at += len(ids[d])
        mask[r, :at] = 1
        document_ids[r, at:] = len(row)  # padding: one more document
    seeds = [s for row in rows for d in row for s in DOCS[d][1]]
    pixels, _, _ = processor.preprocess_images([[noise_image(s) for s in seeds]])
    counts = [sum(len(DOCS[d][1]) for d in row) for row in rows]
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "document_ids": document_ids,
        "pixel_values": pixels,
        "media_slots": media_slots(counts),
        "starts": starts,
        "lengths": [len(t) for t in ids],
        "keys": [f"doc{d}" for row in rows for d in row],
    }


def alone(processor: FlamingoProcessor) -> dict:
    """Every document in its own row, right-padded: the reference."""
    texts = [text for text, _ in DOCS]
    images = [[noise_image(s) for s in seeds] for _, seeds in DOCS]
    return processor(texts, images=images, padding_side="right")


def run(model, batch: dict, labels: torch.Tensor, **packed) -> tuple:
    model.zero_grad()
    kwargs = {k: batch[k] for k in ("attention_mask", "pixel_values", "media_slots")}
    logits = model(batch["input_ids"], **kwargs, **packed).logits
    nll = model(batch["input_ids"], **kwargs, labels=labels, **packed).nll_sum
    nll.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), nll.detach(), grads


CASES = [(t, "sdpa", "last") for t in sorted(TINY_LMS)]
CASES += [(t, "eager", "last") for t in sorted(TINY_LMS)]
CASES += [("llama", "sdpa", "all_previous")]  # each document's own earlier images only


@pytest.mark.parametrize(("model_type", "implementation", "attend"), CASES)
def test_a_packed_batch_gives_each_document_its_unpacked_logits_and_loss(
    model_type, implementation, attend, processor
):
    torch.manual_seed(0)
    cfg = family_config(model_type).replace(
        {"lm.attn_implementation": implementation, "xattn.attend": attend}
    )
    model = Flamingo.from_config(cfg, processor).train()
    set_gates(model)
    packed, reference = pack(processor, ROWS), alone(processor)
    special = processor.special_tokens
    packed_labels = make_labels(
        packed["input_ids"], packed["attention_mask"], special, packed["document_ids"]
    )
    labels = make_labels(reference["input_ids"], reference["attention_mask"], special)
    got = run(model, packed, packed_labels, document_ids=packed["document_ids"])
    want = run(model, reference, labels)
    for d, length in enumerate(packed["lengths"]):
        r, at = packed["starts"][d]
        torch.testing.assert_close(
            got[0][r, at : at + length], want[0][d, :length], rtol=1e-5, atol=1e-5, msg=f"doc {d}"
        )
        assert torch.equal(packed_labels[r, at : at + length], labels[d, :length]), d
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)  # the summed NLL
    assert got[2].keys() == want[2].keys()
    for name, grad in got[2].items():
        # fp32 sums in another order: one new row's element differs by 2.9e-6 (of ~7e-3) on an
        # AMD EPYC here; the same atol as the logits'
        torch.testing.assert_close(
            grad, want[2][name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


POSITIONED = sorted(t for t in TINY_LMS if DECODER_LAYOUTS[t].packed_positions)


@pytest.mark.skipif(
    tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 6),
    reason="transformers' mask builder reads packed position ids from torch 2.6 on",
)
@pytest.mark.parametrize("model_type", POSITIONED)
def test_position_id_boundaries_give_the_block_diagonal_logits(model_type, processor, monkeypatch):
    """What a flash-attention kernel is given (no mask: the boundaries in the restarting
    position ids), followed on the CPU through transformers' own reading of the position ids
    under SDPA: each document's logits equal the block-diagonal mask's."""
    from flamingo.lm import FlamingoLM

    torch.manual_seed(0)
    model = Flamingo.from_config(family_config(model_type), processor).eval()
    set_gates(model)
    packed = pack(processor, ROWS)
    kwargs = {k: packed[k] for k in ("attention_mask", "pixel_values", "media_slots")}
    ids, documents = packed["input_ids"], packed["document_ids"]
    with torch.no_grad():
        want = model(ids, **kwargs, document_ids=documents).logits
        monkeypatch.setattr(FlamingoLM, "packed_boundaries", lambda self: "positions")
        got = model(ids, **kwargs, document_ids=documents).logits
    real = packed["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_across_documents_attends_over_the_row_but_never_to_another_documents_images(processor):
    torch.manual_seed(0)
    model = Flamingo.from_config(family_config("llama"), processor).eval()
    set_gates(model)
    packed, reference = pack(processor, ROWS), alone(processor)
    ids, documents = packed["input_ids"], packed["document_ids"]
    index = media_index_from_ids(ids, processor.special_tokens.image_id, documents)
    plain = media_index_from_ids(ids, processor.special_tokens.image_id)
    second = documents[0] == 1  # document 1 follows document 0's image with text of its own
    first_image = int(
        (ids[0] == processor.special_tokens.image_id).logical_and(second).nonzero()[0]
    )
    assert (plain[0, second][: first_image - int(second.nonzero()[0])] == 0).all()
    assert (index[0, second][: first_image - int(second.nonzero()[0])] == -1).all()
    kwargs = {k: packed[k] for k in ("attention_mask", "pixel_values", "media_slots")}
    with torch.no_grad():
        across = model(ids, **kwargs, document_ids=documents, across_documents=True).logits
        exact = model(ids, **kwargs, document_ids=documents).logits
        want = model(**reference).logits
    n0 = packed["lengths"][0]
    torch.testing.assert_close(across[0, :n0], want[0, :n0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(across[0, second], exact[0, second], atol=1e-4)  # sees doc 0's text


def test_a_training_step_counts_packed_samples_not_rows(processor):
    import train
    from flamingo.losses import count_targets
    from flamingo.training.batches import StepBatches
    from flamingo.training.config import EngineConfig, OptimConfig, TrainConfig
    from flamingo.training.engine import LocalEngine
    from tests.helpers import ROOT, build

    cfg = TrainConfig.from_yaml(ROOT / "configs/train/tiny.yaml")
    model = build().train()
    engine = LocalEngine(model, EngineConfig(), OptimConfig(warmup_steps=0))
    batch = pack(processor, ROWS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    batch["labels"] = make_labels(ids, mask, processor.special_tokens, batch["document_ids"])
    step = StepBatches([("pairs", batch)], {"pairs": float(count_targets(batch["labels"]))})
    nll_sums, samples, info = train.train_step(engine, step, cfg, 1e-3)
    assert samples == 4 and ids.shape[0] == 2  # four documents in two rows
    assert torch.isfinite(nll_sums["pairs"]) and bool(info.applied)


def test_packed_rows_refuse_what_they_cannot_do(processor):
    model = Flamingo.from_config(family_config("llama"), processor)
    packed = pack(processor, ROWS)
    ids, documents = packed["input_ids"], packed["document_ids"]
    with pytest.raises(ValueError, match="not with a cache"):
        model(ids, document_ids=documents, use_cache=True)
    with pytest.raises(ValueError, match="document_ids shape"):
        model(ids, document_ids=documents[:, :3])
    media = {k: packed[k] for k in ("pixel_values", "media_slots")}
    model.lm.hf.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="packed rows need lm.attn_implementation"):
        model(ids, **media, document_ids=documents)
    for family in ("mpt", "opt"):  # no position ids, or a mask built without them
        other = Flamingo.from_config(family_config(family), processor)
        other.lm.hf.config._attn_implementation = "flash_attention_2"
        with pytest.raises(ValueError, match=f"this {family} LM runs 'flash_attention_2'"):
            other(ids, **media, document_ids=documents)


# -- the loader ------------------------------------------------------------------------------


def varied_pairs(tmp_path, n: int = 40) -> str:
    from flamingo.data.schema import encode_pair
    from tests.test_data import COLOURS, solid, write

    rng = random.Random(0)
    words = "a red blue green circle square on the left right of an image".split()
    samples = [
        encode_pair(
            f"p{i:03d}",
            solid(COLOURS[i % 8]),
            "png",
            " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))),
        )
        for i in range(n)
    ]
    return write(tmp_path, samples, "varied", per_shard=8)


def documents(batch: dict) -> dict[str, list[int]]:
    """Each packed sample's tokens, by key (keys are listed row by row, in row order)."""
    keys, out = iter(batch["keys"]), {}
    rows = zip(batch["input_ids"], batch["attention_mask"], batch["document_ids"], strict=True)
    for ids, mask, docs in rows:
        for d in docs[mask.bool()].unique_consecutive().tolist():
            out[next(keys)] = ids[(docs == d) & mask.bool()].tolist()
    return out


def padding(batches: list[dict]) -> float:
    return sum(float((1 - b["attention_mask"]).sum()) for b in batches) / sum(
        b["attention_mask"].numel() for b in batches
    )


def test_the_loader_packs_every_sample_once_and_resumes_exactly(tmp_path, processor):
    from tests.test_data import loader, take

    shards = varied_pairs(tmp_path)
    special = processor.special_tokens
    kw = dict(seq_len=24, shuffle_buffer=4, seed=5, p_flip=0.5)
    unpacked = list(loader(processor, "pairs", shards, batch_size=4, **kw))
    kw.update(packing="block_diagonal", packed_len=64, batch_size=2, pack_window=40)
    packed = list(loader(processor, "pairs", shards, **kw))
    alone = {k: ids[m.bool()].tolist() for b in unpacked for k, ids, m in
             zip(b["keys"], b["input_ids"], b["attention_mask"], strict=True)}  # fmt: skip
    got = {}
    for batch in packed:
        assert batch["input_ids"].shape[1] <= 64
        got.update(documents(batch))
        images = (batch["input_ids"] == special.image_id).sum(1)
        assert ((batch["media_slots"] >= 0).sum(1) == images).all()  # one item per <image>
        assert batch["pixel_values"].shape[0] == images.sum()
    assert got == alone  # every sample once, its tokens unchanged: no data lost
    assert padding(packed) < 0.05 < 0.2 < padding(unpacked)  # 0.02 against 0.22 here
    # exact resume: stop after 3 batches (inside a packing window: 40 samples make about 8 rows,
    # four batches), restore, and the batches go on as if uninterrupted
    kw.update(resampled=True, num_workers=2)
    full = take(iter(loader(processor, "pairs", shards, **kw)), 7)
    first = loader(processor, "pairs", shards, **kw)
    head = take(iter(first), 3)
    restored = loader(processor, "pairs", shards, **kw)
    restored.load_state_dict(first.state_dict())
    tail = take(iter(restored), 4)
    for a, b in zip(full, head + tail, strict=True):
        assert a["keys"] == b["keys"]
        for key in ("input_ids", "document_ids", "pixel_values", "media_slots"):
            assert torch.equal(a[key], b[key]), key


def test_a_resumed_packed_loader_counts_each_skipped_sample_once(tmp_path, processor):
    from flamingo.data.schema import encode_pair
    from tests.test_data import loader, solid, take, write

    samples = [
        encode_pair(f"p{i:03d}", solid((i, 0, 0)) if i % 3 else b"broken", "png", f"a caption {i}")
        for i in range(48)
    ]  # every third image broken: skipped, counted
    shards = write(tmp_path, samples, "bad", per_shard=8)
    kw = dict(seq_len=24, packing="block_diagonal", packed_len=24, batch_size=2, pack_window=12)
    kw.update(resampled=True, max_skip_rate=0.5)
    straight = loader(processor, "pairs", shards, **kw)
    take(iter(straight), 7)
    first = loader(processor, "pairs", shards, **kw)
    take(iter(first), 3)  # inside a packing window
    restored = loader(processor, "pairs", shards, **kw)
    restored.load_state_dict(first.state_dict())
    take(iter(restored), 4)
    assert restored.stats()["skip/image_decode_error"] > 0
    assert restored.stats() == straight.stats()


def test_packing_settings_are_checked():
    from flamingo.data.config import DatasetConfig

    with pytest.raises(ValueError, match="set packing: block_diagonal"):
        DatasetConfig(name="p", kind="pairs", shards="x", packed_len=64)
    with pytest.raises(ValueError, match="packed_len 16 < seq_len 32"):
        DatasetConfig(name="p", kind="pairs", shards="x", packing="block_diagonal", packed_len=16)
