"""Corpus-scale conversion (data_prep/corpus.py): many inputs, workers, parts, resume."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import corpus, interleaved, pairs
from flamingo.data.config import DatasetConfig
from flamingo.data.schema import encode_pair
from flamingo.data.shards import expand_shards, read_shard
from flamingo.data.writing import write_shards
from tests.test_bad_input import pairs_tar

ROOT = Path(__file__).resolve().parents[1]


def photo(seed: int, size: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def mmc4_corpus(root: Path, inputs: int = 4, docs: int = 10, size: int = 16) -> str:
    """``inputs`` MMC4 jsonl files of ``docs`` documents, each input with its own image
    folder (``imgs/{stem}``), and in each input a document whose image is missing, one
    without images above the threshold and a line that is not JSON."""
    for j in range(inputs):
        stem = f"docs_{j}"
        images = root / "imgs" / stem
        images.mkdir(parents=True)
        lines = []
        for d in range(docs):
            names = [f"{d}_{k}.png" for k in range(2)]
            for k, name in enumerate(names):
                if (d, k) != (1, 0):  # doc 1 loses one image (counted, doc kept)
                    (images / name).write_bytes(photo(1000 * j + 10 * d + k, size))
            sims = [[0.3, 0.1], [0.1, 0.3]] if d != 2 else [[0.1, 0.1], [0.1, 0.1]]
            doc = {"text_list": [f"input {j} doc {d} a", "b"], "url": f"u{j}/{d}"}
            doc |= {"image_info": [{"image_name": n} for n in names], "similarity_matrix": sims}
            lines.append(json.dumps(doc))
        lines.insert(3, "{not json")
        (root / f"{stem}.jsonl").write_text("\n".join(lines) + "\n")
    return str(root / "docs_*.jsonl")


def mmc4(spec: str, root: Path, out: Path, *extra: str) -> None:
    images = str(root / "imgs" / "{stem}")
    argv = ["mmc4", "--jsonl", spec, "--images", images, "--out", str(out), *extra]
    interleaved.main([*argv, "--items-per-shard", "3"])


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def summary(out: Path, prefix: str = "mmc4") -> dict:
    return json.loads((out / f"{prefix}-summary.json").read_text())


def test_one_two_workers_and_two_parts_write_the_same_shards(tmp_path):
    spec = mmc4_corpus(tmp_path)
    mmc4(spec, tmp_path, tmp_path / "w1")
    mmc4(spec, tmp_path, tmp_path / "w2", "--workers", "2")
    mmc4(spec, tmp_path, tmp_path / "parts", "--part", "1/2")
    assert not (tmp_path / "parts" / "mmc4-summary.json").exists()  # part 0 still to do
    mmc4(spec, tmp_path, tmp_path / "parts", "--part", "0/2", "--workers", "2")
    one = files(tmp_path / "w1")
    assert len(one) == 4 * 4 and "mmc4-00003-00003.tar" in one  # 10 docs + a bad line, 3 a shard
    assert files(tmp_path / "w2") == one and files(tmp_path / "parts") == one
    assert summary(tmp_path / "w2") == summary(tmp_path / "w1") == summary(tmp_path / "parts")
    s = summary(tmp_path / "w1")
    assert s["samples_written"] == 4 * 9 and s["inputs"] == 4
    assert s["skipped"] == {"bad_json": 4, "no_images": 4}
    assert s["events"]["image_dropped/missing_image"] == 4
    assert [p["input"] for p in s["per_input"]] == sorted(expand_shards(spec))
    keys = [x["__key__"] for name in one for x in read_shard(str(tmp_path / "w1" / name))]
    assert len(keys) == len(set(keys)) == 36 and keys[0] == "00000_doc000000000"
    # what a loader reads: a glob of the output
    cfg = DatasetConfig(name="d", kind="interleaved", shards=f"{tmp_path}/w1/mmc4-*.tar")
    assert len(expand_shards(cfg.shards)) == 16


def test_a_killed_run_resumes_to_the_same_output(tmp_path):
    spec = mmc4_corpus(tmp_path, inputs=6, docs=20, size=200)
    fresh = tmp_path / "fresh"
    mmc4(spec, tmp_path, fresh)
    out = tmp_path / "killed"
    images = str(tmp_path / "imgs" / "{stem}")
    command = [sys.executable, "-m", "data_prep.interleaved", "mmc4", "--jsonl", spec]
    command += ["--images", images, "--out", str(out), "--items-per-shard", "3"]
    job = subprocess.Popen(
        [*command, "--workers", "2"],
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*.tar")) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(job.pid, signal.SIGKILL)  # the converter and its workers, mid-shard
    finally:
        job.wait()
    assert not (out / "mmc4-summary.json").exists(), "the run ended before the kill"
    for shard in out.glob("*.tar"):  # what a loader reads is whole, and has its record
        assert list(read_shard(str(shard)))
        assert (out / "progress" / f"{shard.name}.json").exists()
    mmc4(spec, tmp_path, out, "--workers", "2")
    assert files(out) == files(fresh)
    resumed, first = summary(out), summary(fresh)
    for field in ("skipped", "events", "per_input"):
        assert resumed[field] == first[field]
    assert resumed["samples_written"] + resumed["samples_reused"] == first["samples_written"]
    assert not list(out.glob("*.tmp"))


def test_resuming_one_input_reports_what_a_fresh_run_would(tmp_path):
    def encode(i, die=None):
        if i == die:
            raise KeyboardInterrupt
        if i % 4 == 1:
            from flamingo.data.schema import SkipSample

            raise SkipSample("empty_text")
        return encode_pair(f"k{i}", b"x", "png", "c")

    fresh = write_shards(range(12), encode, tmp_path / "a", "w", items_per_shard=5)
    with pytest.raises(KeyboardInterrupt):
        write_shards(range(12), lambda i: encode(i, die=8), tmp_path / "b", "w", items_per_shard=5)
    resumed = write_shards(range(12), encode, tmp_path / "b", "w", items_per_shard=5)
    assert resumed.shards_reused == ["w-00000.tar"] and resumed.samples_reused == 4
    assert resumed.skipped == fresh.skipped == {"empty_text": 3}
    assert resumed.samples_written + resumed.samples_reused == fresh.samples_written == 9
    assert files(tmp_path / "a") == files(tmp_path / "b")


def test_a_rerun_with_other_options_or_inputs_is_refused(tmp_path, capsys):
    spec = mmc4_corpus(tmp_path, inputs=2, docs=4)
    out = tmp_path / "out"
    mmc4(spec, tmp_path, out)
    before = files(out)
    mmc4(spec, tmp_path, out)  # same options: every input complete, nothing rewritten
    assert files(out) == before and "2 complete from an earlier run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mmc4(spec, tmp_path, out, "--threshold", "0.2")
    assert "other options" in capsys.readouterr().err
    (tmp_path / "docs_0.jsonl").rename(tmp_path / "docs_00.jsonl")
    with pytest.raises(SystemExit):
        mmc4(spec, tmp_path, out)
    assert "other input" in capsys.readouterr().err
    assert files(out) == before


def test_merge_step_lists_missing_inputs_then_merges(tmp_path, capsys):
    spec = mmc4_corpus(tmp_path, inputs=3, docs=4)
    out = tmp_path / "out"
    mmc4(spec, tmp_path, out, "--part", "0/2")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        corpus.main(["--out", str(out), "--prefix", "mmc4"])
    assert exit_info.value.code == 1 and "1 of 3 inputs are not complete: 00001" in (
        capsys.readouterr().out
    )
    mmc4(spec, tmp_path, out, "--part", "1/2")  # the last part merges
    merged = summary(out)
    (out / "mmc4-summary.json").unlink()
    corpus.main(["--out", str(out), "--prefix", "mmc4"])
    assert summary(out) == merged and merged["inputs"] == 3


@pytest.mark.parametrize("part", ["2/2", "1", "a/b", "0/0"])
def test_bad_part_is_a_clear_error(tmp_path, part, capsys):
    spec = mmc4_corpus(tmp_path, inputs=1, docs=1)
    with pytest.raises(SystemExit):
        mmc4(spec, tmp_path, tmp_path / "out", "--part", part)
    assert f"--part {part!r}" in capsys.readouterr().err


def test_missing_inputs_are_named_before_anything_runs(tmp_path, capsys):
    (tmp_path / "in-00000.tar").write_bytes(b"")
    with pytest.raises(SystemExit):
        pairs.main(["--img2dataset", f"{tmp_path}/in-{{00000..00002}}.tar", "--out", "o"])
    assert "2 of 3 inputs are not a file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pairs.main(["--table", f"{tmp_path}/*.parquet", "--out", "o"])
    assert "matches no file" in capsys.readouterr().err


def test_keys_are_unique_across_inputs_and_shards(tmp_path):
    # two input tars with the same keys, and a key twice in one tar (not adjacent)
    pairs_tar(tmp_path / "a.tar", ["000", "001", "000"])
    pairs_tar(tmp_path / "b.tar", ["000", "001"])
    out = tmp_path / "out"
    argv = ["--img2dataset", f"{tmp_path}/*.tar", "--out", str(out), "--items-per-shard", "1"]
    pairs.main(argv)
    keys = [x["__key__"] for name in files(out) for x in read_shard(str(out / name))]
    assert keys == ["00000_000", "00000_001", "00001_000", "00001_001"]
    assert summary(out, "pairs")["skipped"] == {"duplicate_key": 1}


def test_writers_of_one_summary_at_once_each_rename_a_whole_file(tmp_path):
    """Two parts finishing together both merge the summaries: with one shared temporary name,
    one writer's rename found the file already moved by the other (FileNotFoundError)."""
    from concurrent.futures import ThreadPoolExecutor

    from flamingo.data.writing import write_json

    path = tmp_path / "mmc4-summary.json"
    values = [{"writer": i, "pad": "x" * 10_000} for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda v: [write_json(path, v) for _ in range(20)], values))
    assert json.loads(path.read_text()) in values
    assert [p.name for p in tmp_path.iterdir()] == ["mmc4-summary.json"]
