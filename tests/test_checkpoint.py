"""save_pretrained / from_pretrained: identical logits, strict loading, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flamingo import Flamingo, FlamingoProcessor
from tests.helpers import build, noise_image, set_gates

PROMPT = "text first <image>a red circle<|endofchunk|><image>a"


@pytest.fixture
def saved(tmp_path: Path):
    model = build()
    set_gates(model, 0.3)
    with torch.no_grad():
        model.lm.new_tokens.input_rows.add_(1.0)
    model.save_pretrained(tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_round_trip_gives_identical_logits(saved, processor):
    model, path = saved
    files = {p.name for p in path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "frozen.safetensors",
        "processor_config.json",
    } <= files
    loaded = Flamingo.from_pretrained(path)
    loaded_processor = FlamingoProcessor.from_pretrained(path)
    enc = loaded_processor([PROMPT], images=[[noise_image(1), noise_image(2)]])
    assert torch.equal(
        enc["input_ids"],
        processor([PROMPT], images=[[noise_image(1), noise_image(2)]])["input_ids"],
    )
    assert torch.equal(loaded(**enc).logits, model(**enc).logits)
    assert loaded.special_tokens == model.special_tokens


def test_trainable_file_holds_only_trainable_weights(saved):
    model, path = saved
    keys = set(load_file(str(path / "model.safetensors")))
    assert keys == {n for n, p in model.named_parameters() if p.requires_grad}


def test_frozen_parts_with_a_source_are_not_saved(tmp_path, processor):
    model = build()
    model.save_pretrained(tmp_path / "lm")
    lm_dir = tmp_path / "hf_lm"
    model.lm.hf.save_pretrained(lm_dir)
    model.cfg = model.cfg.replace({"lm.architecture": None, "lm.name_or_path": str(lm_dir)})
    model.save_pretrained(tmp_path / "ckpt")
    frozen = set(load_file(str(tmp_path / "ckpt" / "frozen.safetensors")))
    assert frozen and all(k.startswith("vision.") for k in frozen)
    loaded = Flamingo.from_pretrained(tmp_path / "ckpt")
    enc = processor([PROMPT], images=[[noise_image(1), noise_image(2)]])
    assert torch.equal(loaded(**enc).logits, model(**enc).logits)


def test_dtype_and_device_arguments(saved):
    _, path = saved
    loaded = Flamingo.from_pretrained(path, dtype="bfloat16", device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())


def test_missing_and_unexpected_keys_are_named(saved):
    _, path = saved
    tensors = load_file(str(path / "model.safetensors"))
    tensors.pop("resampler.latents")
    tensors["resampler.bogus"] = torch.zeros(1)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(
        ValueError,
        match=r"missing keys \['resampler.latents'\], unexpected keys \['resampler.bogus'\]",
    ):
        Flamingo.from_pretrained(path)


def test_shape_mismatch_is_named(saved):
    _, path = saved
    tensors = load_file(str(path / "model.safetensors"))
    tensors["resampler.latents"] = torch.zeros(3, 3)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"resampler.latents has shape \(3, 3\)"):
        Flamingo.from_pretrained(path)


def test_truncated_safetensors_is_a_clear_error(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        Flamingo.from_pretrained(path)


def test_not_a_checkpoint_and_incompatible_versions(saved, tmp_path):
    _, path = saved
    with pytest.raises(FileNotFoundError):
        Flamingo.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a flamingo checkpoint"):
        Flamingo.from_pretrained(tmp_path / "empty")
    meta = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format 99"):
        Flamingo.from_pretrained(path)
    meta["config"]["resampler"]["flux_capacitor"] = 1
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="incompatible model config.*resampler.flux_capacitor"):
        Flamingo.from_pretrained(path)
    (path / "config.json").write_text(json.dumps({"model_type": "opt"}))
    with pytest.raises(ValueError, match="not a flamingo checkpoint config"):
        Flamingo.from_pretrained(path)


def test_a_checkpoint_from_before_the_engine_owned_checkpointing_loads(saved, processor):
    model, path = saved
    meta = json.loads((path / "config.json").read_text())
    meta["config"]["gradient_checkpointing"] = True  # written by versions before 2026-12
    (path / "config.json").write_text(json.dumps(meta))
    loaded = Flamingo.from_pretrained(path)
    assert loaded.cfg == model.cfg.replace({"lm.tokenizer": str(path)})
    enc = processor([PROMPT], images=[[noise_image(1), noise_image(2)]])
    assert torch.equal(loaded(**enc).logits, model(**enc).logits)


def test_nothing_is_unpickled(saved, monkeypatch):
    _, path = saved

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load must not be called")

    monkeypatch.setattr(torch, "load", refuse)
    Flamingo.from_pretrained(path)


def test_local_sources_are_saved_absolute_so_the_export_loads_from_anywhere(
    tmp_path, monkeypatch, processor
):
    import open_clip

    model = build()
    work = tmp_path / "training"
    (work / "weights").mkdir(parents=True)
    monkeypatch.chdir(work)  # a cluster job: weights pre-downloaded into local folders
    model.lm.hf.save_pretrained("weights/lm")
    clip = open_clip.CLIP(**model.cfg.vision.architecture)
    torch.save(clip.state_dict(), "weights/clip.pt")
    relative = {"lm.architecture": None, "lm.name_or_path": "weights/lm"}
    cfg = model.cfg.replace({**relative, "vision.pretrained": "weights/clip.pt"})
    trained = Flamingo.from_config(cfg, processor)
    trained.save_pretrained("run/model")
    written = json.loads((work / "run" / "model" / "config.json").read_text())["config"]
    assert written["lm"]["name_or_path"] == str(work / "weights" / "lm")
    assert written["vision"]["pretrained"] == str(work / "weights" / "clip.pt")
    monkeypatch.chdir(tmp_path)  # elsewhere
    loaded = Flamingo.from_pretrained(work / "run" / "model")
    enc = processor([PROMPT], images=[[noise_image(1), noise_image(2)]])
    assert torch.equal(loaded(**enc).logits, trained(**enc).logits)


def test_an_earlier_versions_empty_new_token_rows_load_and_other_extras_are_refused(tmp_path):
    """Checkpoints of a model whose tokenizer brings every token (LLaVA's, Llama 3.2 Vision's)
    held its new-token rows as empty parameters; they are empty buffers now (ZeRO-3 cannot
    gather an empty parameter): the empty tensors load, anything else unexpected is refused."""
    from flamingo.checkpoint import load_tensors

    expected = {"projector.w": torch.zeros(2, 3)}
    path = tmp_path / "model.safetensors"
    save_file({**expected, "lm.new_tokens.input_rows": torch.zeros(0, 3)}, str(path))
    assert set(load_tensors(path, expected)) == {"projector.w"}
    save_file({**expected, "lm.new_tokens.input_rows": torch.zeros(1, 3)}, str(path))
    with pytest.raises(ValueError, match="unexpected keys"):
        load_tensors(path, expected)
