"""A corpus conversion meets damage: shards lost or cut after a run finished, unreadable records
and inputs, a parent killed under its workers; LLaVA's records that would teach the wrong thing.

Each case is one that was found losing data silently or stopping a long job (issue 40)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from data_prep import conversations
from data_prep.common import json_list_items
from flamingo.data import writing
from flamingo.data.shards import read_shard
from flamingo.data.writing import write_shards
from tests.test_data import solid

ROOT = Path(__file__).resolve().parents[1]


def turns(*pairs: str) -> list[dict]:
    out = []
    for i, text in enumerate(pairs):
        out.append({"from": "human" if i % 2 == 0 else "gpt", "value": text})
    return out


def llava_corpus(root: Path, files: int = 4, records: int = 40) -> str:
    """``files`` LLaVA JSON files of ``records`` good records each (every fifth with an
    image)."""
    images = root / "images"
    images.mkdir(exist_ok=True)
    (images / "a.png").write_bytes(solid((200, 10, 10)))
    for f in range(files):
        data = []
        for r in range(records):
            record = {"id": f"{f}-{r}", "conversations": turns(f"q {f} {r}", f"a {f} {r}")}
            if r % 5 == 0:
                record["image"] = "a.png"
                record["conversations"][0]["value"] = (
                    "<image>\n" + record["conversations"][0]["value"]
                )
            data.append(record)
        (root / f"chat_{f}.json").write_text(json.dumps(data))
    return str(root / "chat_*.json")


def convert(spec: str, root: Path, out: Path, *extra: str) -> None:
    argv = ["--llava", spec, "--images", str(root / "images"), "--out", str(out)]
    conversations.main([*argv, "--items-per-shard", "6", "--prefix", "chat", *extra])


def shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def samples_in_shards(out: Path) -> int:
    return sum(1 for p in out.glob("*.tar") for _ in read_shard(str(p)))


def merged(out: Path) -> dict:
    return json.loads((out / "chat-summary.json").read_text())


@pytest.mark.parametrize("damage", ["deleted", "zero_bytes", "cut"])
def test_a_finished_inputs_damaged_shard_is_found_and_written_again(tmp_path, damage, capsys):
    spec = llava_corpus(tmp_path)
    out = tmp_path / "out"
    convert(spec, tmp_path, out)
    fresh, counted = shard_files(out), merged(out)
    assert counted["samples_written"] == samples_in_shards(out) == 160
    shard = out / "chat-00001-00002.tar"
    if damage == "deleted":
        shard.unlink()
    elif damage == "zero_bytes":  # what a power cut after an unsynced rename leaves
        shard.write_bytes(b"")
    else:
        shard.write_bytes(shard.read_bytes()[:1000])
    capsys.readouterr()
    convert(spec, tmp_path, out)
    err = capsys.readouterr().err
    assert "3 complete from an earlier run" in err and "1 to convert" in err
    assert "chat-00001-00002.tar" in err and "damaged" in err
    assert shard_files(out) == fresh  # the same bytes as the first run
    after = merged(out)
    assert after["samples_written"] + after["samples_reused"] == samples_in_shards(out) == 160
    redone = json.loads((out / "chat-00001-summary.json").read_text())
    assert redone["shards_written"] == ["chat-00001-00002.tar"]


def test_a_changed_shard_is_found_with_checksums_only_when_asked(tmp_path, capsys):
    spec = llava_corpus(tmp_path, files=2)
    out = tmp_path / "out"
    convert(spec, tmp_path, out)
    fresh = shard_files(out)
    shard = out / "chat-00000-00001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # same size, other bytes (inside the first member's data)
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    convert(spec, tmp_path, out)  # by size: not seen
    assert "2 complete from an earlier run" in capsys.readouterr().err
    convert(spec, tmp_path, out, "--verify", "checksum")
    assert "SHA-256" in capsys.readouterr().err
    assert shard_files(out) == fresh


@pytest.mark.parametrize("damage", ["zero_bytes", "cut"])
def test_a_damaged_shard_of_an_unfinished_input_is_written_again(tmp_path, damage):
    def encode(i):
        return {"__key__": f"k{i:03d}", "txt": f"caption {i}".encode(), "png": solid((i, 0, 0))}

    fresh = write_shards(range(20), encode, tmp_path / "a", "w", items_per_shard=5)
    out = tmp_path / "b"
    write_shards(range(20), encode, out, "w", items_per_shard=5)
    (out / "w-summary.json").unlink()  # as if killed before the input completed
    shard = out / "w-00001.tar"
    shard.write_bytes(b"" if damage == "zero_bytes" else shard.read_bytes()[:700])
    again = write_shards(range(20), encode, out, "w", items_per_shard=5)
    assert again.shards_redone == again.shards_written == ["w-00001.tar"]
    assert again.samples_written + again.samples_reused == fresh.samples_written == 20
    assert shard_files(out) == shard_files(tmp_path / "a")


def test_a_record_written_before_sizes_were_kept_is_checked_by_reading(tmp_path):
    def encode(i):
        return {"__key__": f"k{i:03d}", "txt": b"x" * 600}

    out = tmp_path / "out"
    write_shards(range(10), encode, out, "w", items_per_shard=5)
    for record in (out / "progress").glob("*.json"):  # the older record format
        value = json.loads(record.read_text())
        record.write_text(
            json.dumps({k: value[k] for k in ("fingerprint", "samples", "skipped", "events")})
        )
    (out / "w-00001.tar").write_bytes((out / "w-00001.tar").read_bytes()[:1500])
    again = write_shards(range(10), encode, out, "w", items_per_shard=5)
    assert again.shards_reused == ["w-00000.tar"] and again.shards_redone == ["w-00001.tar"]


def test_shards_and_records_are_synced_before_they_are_renamed(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("rename", str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(writing.os, "fsync", fsync)
    monkeypatch.setattr(writing.os, "replace", replace)
    write_shards(
        range(3), lambda i: {"__key__": f"k{i}", "txt": b"x"}, tmp_path, "w", items_per_shard=5
    )
    shard, record = str(tmp_path / "w-00000.tar"), str(tmp_path / "progress" / "w-00000.tar.json")
    # a temporary name is the final one + ".tmp", or + ".PID-RANDOM.tmp" (write_json's)
    order = [(kind, re.sub(r"(\.\d+-[0-9a-f]+)?\.tmp$", "", path)) for kind, path in events]
    # the record, then the shard: each file synced, renamed, and its folder synced
    assert order.index(("fsync", record)) < order.index(("rename", record))
    assert order.index(("rename", record)) < order.index(("fsync", str(tmp_path / "progress")))
    assert order.index(("fsync", shard)) < order.index(("rename", shard))
    assert order.index(("rename", shard)) < len(order) - 1 - order[::-1].index(
        ("fsync", str(tmp_path))
    )
    assert order.index(("rename", record)) < order.index(("rename", shard))


def test_one_bad_record_costs_that_record_only(tmp_path):
    good = [{"id": str(i), "conversations": turns("q", f"a{i}")} for i in range(5)]
    parts = [json.dumps(r).encode() for r in good]
    parts[1] = parts[1].replace(b"a1", b"a\xff1")  # a byte that is not UTF-8
    parts[3] = b"[" * 1200 + b"]" * 1200  # nested deeper than the parser goes
    path = tmp_path / "chat.json"
    path.write_bytes(b"[" + b",\n".join(parts) + b"]")
    values = list(json_list_items(path))
    assert [v.get("id") for v in values] == ["0", None, "2", None, "4"]
    assert values[1]["__error__"][0] == "bad_encoding" and values[3]["__error__"][0] == "bad_json"
    # broken JSON inside one record, then a file cut inside the last one
    path.write_bytes(
        b'[{"id": "0", "conversations": []}, {"id": 1 2}, {"id": "2"}, {"id": "3", "con'
    )
    values = list(json_list_items(path))
    assert [v.get("id", v.get("__error__", ("",))[0]) for v in values] == [
        "0",
        "bad_json",
        "2",
        "bad_json",
    ]
    path.write_bytes(b'{"id": 1}')
    with pytest.raises(ValueError, match="not a list"):
        list(json_list_items(path))


def test_an_unreadable_input_is_named_and_can_be_left_out_without_renumbering(tmp_path, capsys):
    spec = llava_corpus(tmp_path, files=3)
    full = tmp_path / "full"
    convert(spec, tmp_path, full)
    original = (tmp_path / "chat_1.json").read_bytes()
    (tmp_path / "chat_1.json").write_text('{"not": "a list"}')
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        convert(spec, tmp_path, out)
    err = capsys.readouterr().err
    assert "chat_1.json" in err and "--skip-input" in err
    convert(spec, tmp_path, out, "--skip-input", str(tmp_path / "chat_1.json"))
    written = shard_files(out)
    assert written == {k: v for k, v in shard_files(full).items() if "-00001-" not in k}
    summary = merged(out)
    assert summary["inputs"] == 3 and summary["inputs_skipped"] == [str(tmp_path / "chat_1.json")]
    assert summary["samples_written"] == 80 and summary["per_input"][1]["excluded"]
    assert "inputs skipped (--skip-input): 1" in capsys.readouterr().out
    # once repaired, a run without the option converts it and nothing else
    (tmp_path / "chat_1.json").write_bytes(original)
    convert(spec, tmp_path, out)
    assert merged(out)["inputs_skipped"] == [] and shard_files(out) == shard_files(full)
    with pytest.raises(SystemExit):
        convert(spec, tmp_path, out, "--skip-input", str(tmp_path / "nope.json"))
    assert "not one of the 3 inputs" in capsys.readouterr().err


def test_llava_records_that_teach_the_wrong_thing_are_counted(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(solid((200, 10, 10)))
    records = [
        {"id": "ok", "image": "a.png", "conversations": turns("<image>\nq", "a")},
        {"id": "empty", "conversations": turns("q", "a", "more?", "")},
        {"id": "missing", "image": "a.png", "conversations": turns("q", "a")},
        {"id": "twice", "image": "a.png", "conversations": turns("<image> q <image>", "a")},
        {"id": "later", "image": "a.png", "conversations": turns("q", "a", "<image>\nq2", "b")},
        {"id": "stray", "conversations": turns("<image>\nq", "a")},
    ]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(records))
    out = tmp_path / "out"
    conversations.main(
        ["--llava", str(path), "--images", str(tmp_path / "images"), "--out", str(out)]
    )
    summary = json.loads((out / "conversations-summary.json").read_text())
    assert summary["samples_written"] == 5 and summary["skipped"] == {"empty_reply": 1}
    assert summary["events"] == {
        "image_marker_missing": 1,
        "image_marker_repeated": 1,
        "image_marker_moved": 1,
        "image_marker_without_image": 1,
    }


def test_workers_end_when_their_parent_is_killed(tmp_path):
    spec = llava_corpus(tmp_path, files=6, records=400)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "data_prep.conversations", "--llava", spec]
    command += ["--images", str(tmp_path / "images"), "--out", str(out), "--items-per-shard", "2"]
    job = subprocess.Popen(
        [*command, "--workers", "2"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    workers: list[psutil.Process] = []
    try:
        parent = psutil.Process(job.pid)
        deadline = time.monotonic() + 120
        while not list(out.glob("*.tar")) and time.monotonic() < deadline:
            time.sleep(0.01)
        workers = [
            p
            for p in parent.children(recursive=True)
            if "resource_tracker" not in " ".join(p.cmdline())
        ]
        assert workers, "the converter started no workers"
        os.kill(job.pid, signal.SIGKILL)  # the parent alone, not its process group
        job.wait()
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"{len(alive)} worker(s) outlived their parent"
        count = len(list(out.glob("*.tar")))
        time.sleep(1.5)
        assert len(list(out.glob("*.tar"))) == count, "shards were written after the kill"
    finally:
        for p in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        job.kill()
        job.wait()


def test_records_and_summaries_that_are_json_but_no_object(tmp_path, capsys, caplog):
    spec = llava_corpus(tmp_path, files=2)
    out = tmp_path / "out"
    convert(spec, tmp_path, out)
    fresh = shard_files(out)
    (out / "progress" / "chat-00000-00001.tar.json").write_text("[]")
    (out / "chat-00000-summary.json").unlink()  # the input is unfinished: its records are read
    convert(spec, tmp_path, out)
    assert "not a record" in caplog.text and shard_files(out) == fresh
    (out / "chat-00001-summary.json").write_text("[1, 2]")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        convert(spec, tmp_path, out)
    assert "chat-00001-summary.json holds a JSON list" in capsys.readouterr().err
