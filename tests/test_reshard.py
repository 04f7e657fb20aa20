"""A loader's position carried over to another number of ranks: in epoch mode every sample not
yet delivered is delivered once, none twice (flamingo/data/reshard.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from flamingo import FlamingoProcessor
from flamingo.data.config import DatasetConfig
from flamingo.data.pipeline import FlamingoLoader, merge_states
from flamingo.data.schema import encode_pair
from tests.helpers import tiny_config
from tests.test_data import COLOURS, solid, write


@pytest.fixture(scope="module")
def processor() -> FlamingoProcessor:
    return FlamingoProcessor.from_config(tiny_config())


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("reshard")
    samples = [
        encode_pair(f"s{i:03d}", solid(COLOURS[i % 8]), "png", f"shape {i}") for i in range(60)
    ]
    return write(root, samples, "p", per_shard=5)  # 12 shards


def make(processor, shards, rank: int, world: int, **kw) -> FlamingoLoader:
    fields = dict(batch_size=2, seq_len=32, p_flip=0.0, shuffle_buffer=3, resampled=False)
    fields.update(kw)
    cfg = DatasetConfig(name="pairs", kind="pairs", shards=shards, **fields)
    return FlamingoLoader.from_processor(
        cfg, processor, seed=3, num_workers=0, rank=rank, world_size=world
    )


def keys(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def take(loader: FlamingoLoader, n: int) -> list[str]:
    it, out = iter(loader), []
    for _ in range(n):
        out += next(it)["keys"]
    return out


def drain(loader: FlamingoLoader) -> list[str]:
    """The rest of the loader's current epoch."""
    return keys(iter(loader))


@pytest.mark.parametrize("world", [1, 3])
def test_a_position_of_two_ranks_carries_over_to_another_number(processor, shards, world):
    old = [make(processor, shards, r, 2) for r in range(2)]
    delivered = take(old[0], 4) + take(old[1], 7)  # mid-shard, and each at its own place
    state = merge_states([loader.state_dict() for loader in old])
    new = [make(processor, shards, r, world) for r in range(world)]
    for loader in new:
        loader.load_state_dict(state)
    after = [k for loader in new for k in drain(loader)]
    seen = Counter(delivered + after)
    assert len(seen) == 60 and set(seen.values()) == {1}  # every sample of the epoch once
    assert set(delivered).isdisjoint(after)


def test_streams_in_different_epochs_carry_over(processor, shards):
    # rank 0 finishes epoch 0 and reads into epoch 1 while rank 1 is still in epoch 0
    old = [make(processor, shards, r, 2) for r in range(2)]
    epoch0 = drain(old[0]) + take(old[1], 3)
    epoch1 = take(old[0], 2)
    state = merge_states([loader.state_dict() for loader in old])
    new = [make(processor, shards, r, 3) for r in range(3)]
    for loader in new:
        loader.load_state_dict(state)
    epoch0 += [k for loader in new for k in drain(loader)]
    epoch1 += [k for loader in new for k in drain(loader)]
    for seen in (Counter(epoch0), Counter(epoch1)):
        assert len(seen) == 60 and set(seen.values()) == {1}
    # then the usual shares of the next epoch: every sample once more
    epoch2 = Counter(k for loader in new for k in drain(loader))
    assert len(epoch2) == 60 and set(epoch2.values()) == {1}


def test_a_carried_position_is_saved_and_restored_exactly(processor, shards):
    old = [make(processor, shards, r, 2) for r in range(2)]
    take(old[0], 3), take(old[1], 5)
    state = merge_states([loader.state_dict() for loader in old])
    straight = make(processor, shards, 0, 1)
    straight.load_state_dict(state)
    whole = drain(straight)
    first = make(processor, shards, 0, 1)
    first.load_state_dict(state)
    head = take(first, 4)
    again = make(processor, shards, 0, 1)
    again.load_state_dict(first.state_dict())  # the same number of streams: no resharding
    assert head + drain(again) == whole


def test_resampled_streams_draw_afresh_and_datasets_draw_apart(processor, shards):
    old = [make(processor, shards, r, 2, resampled=True) for r in range(2)]
    take(old[0], 6), take(old[1], 2)
    state = merge_states([loader.state_dict() for loader in old])
    new = make(processor, shards, 0, 1, resampled=True)
    new.load_state_dict(state)
    drawn = max(s["shard_pos"] for s in state["streams"].values())
    assert all(s.shard_pos > drawn for s in new._states.values())
    assert len(take(new, 3)) == 6
    # two resampled datasets over the same shards draw them in different orders
    a = make(processor, shards, 0, 1, resampled=True)
    cfg = DatasetConfig(
        name="other",
        kind="pairs",
        shards=shards,
        batch_size=2,
        seq_len=32,
        resampled=True,
        shuffle_buffer=3,
    )
    b = FlamingoLoader.from_processor(cfg, processor, seed=3, num_workers=0)
    assert take(a, 5) != take(b, 5)
