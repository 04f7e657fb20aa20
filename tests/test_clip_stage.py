"""flamingo.training.clip_stage: open_clip_train's webdataset reader, repaired (the demo test
runs the whole trainer through it)."""

from __future__ import annotations

import inspect
import logging
import pickle

import pytest
from webdataset.tariterators import tar_file_expander

from data_prep.tiny import write_tiny_shards
from flamingo.data.shards import expand_shards
from flamingo.training import clip_stage

oc_data = pytest.importorskip("open_clip_train.data")


def shard_urls(tmp_path) -> list[dict]:
    spec = write_tiny_shards(tmp_path, per_kind=12, shards=3)["pairs"]
    return [{"url": url} for url in expand_shards(spec)]


def test_every_pair_comes_through_and_nothing_else(tmp_path):
    samples = list(clip_stage.tarfile_to_samples(shard_urls(tmp_path)))
    assert len(samples) == 12
    assert all({"png", "txt"} <= set(sample) for sample in samples)
    assert len({sample["__key__"] for sample in samples}) == 12


@pytest.mark.skipif(
    "eof_value" not in inspect.signature(tar_file_expander).parameters,
    reason="webdataset < 0.2.96 writes no end-of-tar sample",
)
def test_open_clip_train_alone_still_fails_on_the_end_of_tar_sample(tmp_path):
    # When this fails, open_clip_train reads webdataset's end-of-tar sample itself and
    # clip_stage's repair can go.
    with pytest.raises(KeyError, match="fname"):
        list(oc_data.tarfile_to_samples_nothrow(shard_urls(tmp_path)))


def test_repaired_swaps_in_and_restores_everything():
    original = oc_data.tarfile_to_samples_nothrow
    handlers = list(logging.getLogger().handlers)
    torch_level = logging.getLogger("torch").level
    with clip_stage.repaired(in_order=True):
        assert oc_data.tarfile_to_samples_nothrow is clip_stage.tarfile_to_samples
        assert oc_data._SAMPLE_SHUFFLE_SIZE == oc_data._SAMPLE_SHUFFLE_INITIAL == 1
        # a spawned DataLoader worker unpickles the pipeline's steps by name: ours, not theirs
        assert pickle.loads(pickle.dumps(oc_data.tarfile_to_samples_nothrow)) is (
            clip_stage.tarfile_to_samples
        )
        for _ in range(2):  # as open_clip_train's main does: a stream and a file handler
            logging.getLogger().addHandler(logging.NullHandler())
        logging.getLogger("torch").setLevel(logging.DEBUG)
    assert oc_data.tarfile_to_samples_nothrow is original
    assert (oc_data._SAMPLE_SHUFFLE_SIZE, oc_data._SAMPLE_SHUFFLE_INITIAL) == (5000, 1000)
    assert logging.getLogger().handlers == handlers
    assert logging.getLogger("torch").level == torch_level


def test_a_run_that_open_clip_train_refuses_is_an_error(tmp_path, monkeypatch):
    from open_clip_train import main as oc_main

    monkeypatch.setattr(oc_main, "main", lambda args: -1)
    with pytest.raises(RuntimeError, match="refused to start.*--name"):
        clip_stage.run(["--name", "x"])


@pytest.mark.parametrize("in_order", [True, False])
def test_in_order_batches_are_runs_of_consecutive_pairs(tmp_path, in_order):
    """open_clip_train's own training pipeline: with ``in_order`` every batch is a run of
    consecutive pairs of one shard (the toy world's twins stay together); shuffled, not."""
    import torch
    from open_clip_train.params import parse_args

    spec = write_tiny_shards(tmp_path, per_kind=48, shards=4)["pairs"]  # 12 pairs a shard
    captions = {}  # shard -> its captions in order
    for url in expand_shards(spec):
        samples = clip_stage.tarfile_to_samples([{"url": url}])
        captions[url] = [sample["txt"].decode() for sample in samples]
    words = {"red": 0, "green": 1, "blue": 2, "yellow": 3}

    def tokenize(text: str) -> torch.Tensor:  # "a red square" -> [[0]], as open_clip's (1, T)
        return torch.tensor([[words[text.split()[1]]]])

    args = parse_args(
        ["--train-data", spec, "--dataset-resampled", "--train-num-samples", "64"]
        + ["--batch-size", "4", "--workers", "0", "--seed", "0"]
    )
    args.world_size = 1
    with clip_stage.repaired(in_order=in_order):
        loader = oc_data.get_wds_dataset(
            args, lambda image: torch.zeros(1), True, tokenizer=tokenize
        ).dataloader
        batches = [text.flatten().tolist() for _, text in loader]
    windows = {
        tuple(words[c.split()[1]] for c in shard[i : i + 4])
        for shard in captions.values()
        for i in range(0, 12, 4)
    }
    in_windows = [tuple(batch) in windows for batch in batches]
    assert len(batches) == 16
    assert all(in_windows) if in_order else not all(in_windows)
