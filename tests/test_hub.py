"""Checkpoints by Hub id (flamingo/hub.py), offline, against a Hugging Face cache laid out in a
temp dir the standard way: our format by id and revision, an OpenFlamingo release converted
once, and the errors that say what is missing."""

from __future__ import annotations

import pytest
import torch

from flamingo import Flamingo, FlamingoProcessor, formats, hub
from tests.helpers import COMMIT, OTHER, build, lay_out, noise_image, set_gates
from tests.test_openflamingo import backbones, openflamingo_model, our_config  # noqa: F401


def logits(model, processor):
    enc = processor(["<image>a red circle<|endofchunk|>"], images=[[noise_image(1)]])
    with torch.no_grad():
        return model.eval()(**enc).logits


def test_our_format_loads_by_repo_id_and_revision(tmp_path, offline_cache):
    model = build()
    set_gates(model)
    model.save_pretrained(tmp_path / "v1")
    set_gates(model, 0.3)
    model.save_pretrained(tmp_path / "v2")
    lay_out(offline_cache, "someone/tiny-flamingo", tmp_path / "v2")  # main
    lay_out(offline_cache, "someone/tiny-flamingo", tmp_path / "v1", OTHER, main=False)
    processor = FlamingoProcessor.from_pretrained("someone/tiny-flamingo")
    latest = Flamingo.from_pretrained("someone/tiny-flamingo")
    older = Flamingo.from_pretrained("someone/tiny-flamingo", revision=OTHER)
    torch.testing.assert_close(logits(latest, processor), logits(model, processor))
    assert not torch.allclose(logits(older, processor), logits(latest, processor))
    assert torch.equal(
        logits(older, processor),
        logits(Flamingo.from_pretrained(tmp_path / "v1"), processor),  # a local directory
    )


def test_a_name_neither_here_nor_cached_says_so(tmp_path, offline_cache):
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        Flamingo.from_pretrained("someone/missing")
    with pytest.raises(FileNotFoundError, match="no checkpoint directory at .*no Hub repo id"):
        Flamingo.from_pretrained(tmp_path / "nowhere")  # a path, never sent to the Hub
    assert hub.is_repo_id("openflamingo/OpenFlamingo-9B-vitl-mpt7b")
    assert not any(map(hub.is_repo_id, ("ckpt", "runs/demo/model", "/abs/x", "a/../b")))
    with pytest.raises(ValueError, match="Flamingo.from_pretrained"):
        FlamingoProcessor.from_pretrained("openflamingo/OpenFlamingo-9B-vitl-mpt7b")


STAND_IN = "openflamingo/OpenFlamingo-Tiny-test"


@pytest.fixture
def stand_in_release(
    tmp_path,
    offline_cache,
    monkeypatch,
    backbones,  # noqa: F811 (test_openflamingo's fixture)
):
    """A tiny OpenFlamingo model's checkpoint.pt in the Hub cache as a release: the id in
    the release table, its config the tiny one. Returns the checkpoint file."""
    theirs, _ = openflamingo_model(backbones)
    torch.save(theirs.state_dict(), tmp_path / "checkpoint.pt")
    lay_out(offline_cache, STAND_IN, tmp_path / "checkpoint.pt")
    monkeypatch.setitem(hub.OPENFLAMINGO_RELEASES, STAND_IN, ("stand-in", ()))
    monkeypatch.setattr(hub, "release_config", lambda repo, overrides=None: our_config(backbones))
    return tmp_path / "checkpoint.pt"


def test_an_openflamingo_release_id_is_converted_once(stand_in_release, monkeypatch):
    converted = []
    original = formats.convert
    monkeypatch.setattr(formats, "convert", lambda *a: converted.append(a[0]) or original(*a))
    first = Flamingo.from_pretrained(STAND_IN)
    again = Flamingo.from_pretrained(STAND_IN)
    assert converted == ["openflamingo"]  # the second load reads the converted copy
    out = hub.converted_dir(STAND_IN, COMMIT)
    assert (out / "config.json").is_file()
    processor = FlamingoProcessor.from_pretrained(out)
    direct = Flamingo.from_openflamingo(stand_in_release, hub.release_config(STAND_IN))
    torch.testing.assert_close(logits(first, processor), logits(direct, processor))
    assert torch.equal(logits(again, processor), logits(first, processor))


def test_the_converter_takes_a_release_id(stand_in_release, tmp_path):
    from flamingo.convert.__main__ import main

    main(["openflamingo", STAND_IN, str(tmp_path / "out")])
    assert (tmp_path / "out" / "config.json").is_file()
    with pytest.raises(SystemExit):  # an id that is no release needs --config
        main(["openflamingo", "someone/other", str(tmp_path / "out2")])


def test_a_hub_id_without_the_hub_fails_at_once_in_one_message(tmp_path, monkeypatch):
    """Without network a Hub id waited ~45 s through huggingface_hub's retries, a warning
    for each: now one connection attempt, then the cache or an error saying both."""
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    hub._probe.cache_clear()
    assert "cannot be reached" in hub.hub_unreachable()
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=r"not in the Hugging Face cache, and the Hub"):
        Flamingo.from_pretrained("someone/not-cached")
    assert time.monotonic() - start < 10
    probes = hub._probe.cache_info()
    assert probes.misses == 1 and probes.hits >= 2  # the load asks several times: one probe
    hub._probe.cache_clear()  # the next test's endpoint is probed afresh
