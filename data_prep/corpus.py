"""Converting a corpus: many inputs, several processes, several machines, resumable.

Every converter runs through :func:`convert`. Its inputs (a brace-expanded list or a glob,
``docs/shard_{0..23098}.jsonl`` or ``'docs/*.jsonl'``) form one sorted list, and input ``j`` is
converted by one process, on its own, into shards of its own:

    OUT/PREFIX-JJJJJ-KKKKK.tar        input j's k-th shard (one input: PREFIX-KKKKK.tar)
    OUT/PREFIX-JJJJJ-summary.json     input j is complete: what it wrote and skipped, by reason
    OUT/PREFIX-summary.json           every input complete: the summaries merged
    OUT/progress/*.tar.json           each finished shard's record (what resume reads)

A shard's name and bytes depend only on the input list and the options, never on
``--workers`` or on which process finishes first; a key holds its input's index
(``JJJJJ_key``), so keys are unique across the output. ``--part I/N`` converts the inputs
``j`` with ``j % N == I`` only, so N machines (or a scheduler's job array) split a corpus
without talking to each other; whichever part completes the last input merges the
summaries, and ``python -m data_prep.corpus --out OUT --prefix PREFIX`` merges (or says what
is missing) at any time. A re-run skips complete inputs, keeps the finished shards of the
others and writes the rest; a run with other options over the same output is refused.

Before a complete input is skipped, its shards are checked against their records (present,
the size written; with ``--verify checksum`` the SHA-256 too): an input with a damaged shard
(deleted, cut short, zero bytes after a power cut) is converted again, its good shards kept.
An input that cannot be read at all stops the run with its name; ``--skip-input PATH`` goes on
without it, the other inputs keeping their numbers (so their shards and keys stay the same),
and the summaries list it as skipped. Workers end with the process that started them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_prep.workers import run_all
from flamingo.data.shards import expand_shards
from flamingo.data.writing import (
    EXAMPLES,
    RECORDS,
    OutputMismatch,
    WriteSummary,
    read_record,
    shard_problem,
    write_json,
    write_shards,
)


@dataclass
class Work:
    """What a converter makes of one input: its items, in order, and how each is encoded."""

    items: Iterable[Any]
    encode: Callable[[Any], dict | list[dict]]
    total: int | None = None
    events: Counter = field(default_factory=Counter)
    """Updated by ``encode`` (changes inside written samples, e.g. an image dropped)."""
    input_events: Counter = field(default_factory=Counter)
    """Updated while ``items`` are read (e.g. a damaged input file)."""


Build = Callable[[argparse.Namespace, tuple[str, ...], int], Work]
"""A converter's ``build(args, inputs, j)``, the work of input ``inputs[j]``: a module-level
function (workers import it)."""

RUN_OPTIONS = ("out", "workers", "part", "verify", "skip_input", "max_skip_ratio")
"""Options that do not change what is written (``common.add_output_args`` adds them);
every other one must match on resume."""


def parse_part(text: str) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--part {text!r}: expected I/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--part {text!r}: needs N >= 1 and 0 <= I < N")
    return index, count


def expand_inputs(spec: str, what: str = "file") -> list[str]:
    """The sorted, de-duplicated inputs a spec names; a local name that does not exist (or
    is not a ``what``: ``file`` or ``dir``) is an error listing the first few. URLs and
    ``pipe:`` commands (webdataset's) pass unchecked."""
    inputs = sorted(set(expand_shards(spec)))
    local = [p for p in inputs if "://" not in p and not p.startswith("pipe:")]
    wrong = [p for p in local if not (Path(p).is_dir() if what == "dir" else Path(p).is_file())]
    if wrong:
        shown = ", ".join(wrong[:3]) + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        raise ValueError(
            f"{spec!r}: {len(wrong)} of {len(inputs)} inputs are not a {what}: {shown}"
        )
    return inputs


@dataclass(frozen=True)
class Layout:
    """Where a conversion's files go (the names in the module docstring)."""

    out: Path
    prefix: str
    inputs: tuple[str, ...]

    def input_prefix(self, j: int) -> str:
        return self.prefix if len(self.inputs) == 1 else f"{self.prefix}-{j:05d}"

    def key_tag(self, j: int) -> str:
        return "" if len(self.inputs) == 1 else f"{j:05d}_"

    def input_summary(self, j: int) -> Path:
        return self.out / f"{self.input_prefix(j)}-summary.json"

    @property
    def merged(self) -> Path:
        return self.out / f"{self.prefix}-summary.json"


@dataclass(frozen=True)
class Task:
    build: Build
    args: argparse.Namespace
    layout: Layout
    index: int
    manifest: dict[str, Any]
    desc: str
    progress: bool


def _tagged(encode: Callable, tag: str) -> Callable:
    if not tag:
        return encode

    def tagged_encode(item: Any) -> dict | list[dict]:
        samples = encode(item)
        for sample in samples if isinstance(samples, list) else [samples]:
            sample["__key__"] = tag + sample["__key__"]
        return samples

    return tagged_encode


def _convert_one(task: Task) -> dict[str, Any]:
    """Convert one input (in a worker, or in the main process). An input that cannot be read
    at all is an error naming it and the way to go on without it."""
    layout, j = task.layout, task.index
    try:
        work = task.build(task.args, layout.inputs, j)
        summary = write_shards(
            work.items,
            _tagged(work.encode, layout.key_tag(j)),
            layout.out,
            layout.input_prefix(j),
            task.args.items_per_shard,
            work.total,
            task.desc,
            events=work.events,
            input_events=work.input_events,
            manifest=task.manifest,
            progress=task.progress,
            checksum=task.args.verify == "checksum",
        )
    except OutputMismatch:
        raise
    except ValueError as e:
        raise ValueError(
            f"input {j} ({layout.inputs[j]}): {e}. To convert the other inputs without it "
            f"(they keep their numbers, so their shards stay the same): --skip-input "
            f"{layout.inputs[j]}"
        ) from None
    return {**task.manifest, **summary.to_dict()}


def settings(args: argparse.Namespace, input_option: str) -> dict[str, Any]:
    """The options that shape the output, as JSON values (paths as strings); the inputs
    themselves are compared one by one instead (a glob and a brace list may name the same)."""
    return {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in sorted(vars(args).items())
        if k not in (*RUN_OPTIONS, input_option)
    }


def _read(path: Path) -> dict[str, Any] | None:
    """A summary this module wrote; None when there is none or it is cut short (its input is
    then converted again). JSON that is not an object is no summary of ours: an error."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(value, dict):
        raise ValueError(
            f"{path} holds a JSON {type(value).__name__}, not a conversion summary: delete it "
            "(its input is then converted again, its finished shards kept)"
        )
    return value


def merge(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-input summaries (in input order) -> one: totals, and each input's line."""
    total: dict[str, Any] = {
        "inputs": len(summaries),
        "inputs_skipped": [s["input"] for s in summaries if s.get("excluded")],
        "shards_written": [],
        "shards_reused": [],
        "shards_redone": [],
        "samples_written": 0,
        "samples_reused": 0,
    }
    skipped, events, per_input = Counter(), Counter(), []
    examples: dict[str, list[str]] = {}
    for s in summaries:
        for key in ("shards_written", "shards_reused", "shards_redone"):
            total[key] += s.get(key, [])
        total["samples_written"] += s["samples_written"]
        total["samples_reused"] += s["samples_reused"]
        skipped.update(s["skipped"])
        events.update(s["events"])
        for reason, found in s.get("skipped_examples", {}).items():
            kept = examples.setdefault(reason, [])
            tag = f"{s['input']}, " if len(summaries) > 1 else ""
            kept += [f"{tag}{e}" for e in found[: EXAMPLES - len(kept)]]
        line = {
            "input": s["input"],
            "samples": s["samples_written"] + s["samples_reused"],
            "skipped": s["skipped"],
            "events": s["events"],
        }
        per_input.append({**line, "excluded": True} if s.get("excluded") else line)
    return {
        **total,
        "skipped": dict(skipped),
        "skipped_examples": examples,
        "events": dict(events),
        "per_input": per_input,
    }


def report(summary: dict[str, Any]) -> str:
    totals = WriteSummary(
        summary["shards_written"],
        summary["shards_reused"],
        summary["samples_written"],
        summary["samples_reused"],
        Counter(summary["skipped"]),
        Counter(summary["events"]),
        summary.get("shards_redone", []),
        summary.get("skipped_examples", {}),
    )
    lines = [f"inputs: {summary['inputs']}"]
    left_out = summary.get("inputs_skipped", [])
    if left_out:
        shown = ", ".join(left_out[:5]) + (
            f" and {len(left_out) - 5} more" if len(left_out) > 5 else ""
        )
        lines.append(f"inputs skipped (--skip-input): {len(left_out)}: {shown}")
    return "\n".join([*lines, totals.report()])


def try_merge(layout: Layout) -> dict[str, Any] | None:
    """Write the merged summary if every input is complete; None (and nothing written) if
    one is not."""
    summaries = [_read(layout.input_summary(j)) for j in range(len(layout.inputs))]
    if any(s is None for s in summaries):
        return None
    merged = merge(summaries)
    if len(layout.inputs) > 1:
        write_json(layout.merged, merged)
    return merged


def _check_earlier(layout: Layout, manifest_of: Callable[[int], dict], mine: list[int]) -> None:
    """Refuse an output that an earlier run with other inputs or options wrote."""
    for j in mine:
        earlier = _read(layout.input_summary(j))
        if earlier is None:
            continue
        now = manifest_of(j)
        if earlier.get("input") != now["input"] or earlier.get("settings") != now["settings"]:
            changed = "input" if earlier.get("input") != now["input"] else "options"
            raise ValueError(
                f"{layout.input_summary(j)}: an earlier run converted input {j} with other "
                f"{changed} ({earlier.get('input')!r}, {earlier.get('settings')}); this run: "
                f"{now['input']!r}, {now['settings']}. Convert into a new --out, or delete "
                "the old output first"
            )


def damaged_shards(layout: Layout, summary: dict[str, Any], checksum: bool) -> list[str]:
    """What is wrong with the shards a complete input's summary lists (empty: nothing),
    each shard checked against its record (``checksum``: to the SHA-256)."""
    problems = []
    for name in summary.get("shards_written", []) + summary.get("shards_reused", []):
        shard = layout.out / name
        record = read_record(shard)
        problem = "no record" if record is None else shard_problem(shard, record, checksum)
        if problem is not None:
            problems.append(f"{shard}: {problem}")
    return problems


def _skipped_inputs(args: argparse.Namespace, inputs: list[str]) -> set[int]:
    """The indices of the inputs ``--skip-input`` names (each must be one of the inputs)."""
    named = list(getattr(args, "skip_input", None) or [])
    by_path = {str(Path(p).resolve()) if "://" not in p else p: j for j, p in enumerate(inputs)}
    found = set()
    for path in named:
        key = str(Path(path).resolve()) if "://" not in path else path
        if key not in by_path:
            raise ValueError(f"--skip-input {path}: not one of the {len(inputs)} inputs")
        found.add(by_path[key])
    if found and len(found) == len(inputs):
        raise ValueError("--skip-input names every input: nothing would be converted")
    return found


def _exclude(layout: Layout, j: int, manifest: dict[str, Any]) -> None:
    """Mark input ``j`` skipped (its summary says so) and remove the shards an earlier run
    wrote of it, so the output holds what a run that never read it would write."""
    if _read(layout.input_summary(j)) == {**manifest, **WriteSummary().to_dict(), "excluded": True}:
        return
    stale = sorted(layout.out.glob(f"{layout.input_prefix(j)}-[0-9][0-9][0-9][0-9][0-9].tar"))
    for shard in stale:
        shard.unlink()
        (layout.out / RECORDS / f"{shard.name}.json").unlink(missing_ok=True)
    if stale:
        print(f"input {j} is skipped: removed its {len(stale)} shard(s) from an earlier run")
    layout.merged.unlink(missing_ok=True)
    write_json(layout.input_summary(j), {**manifest, **WriteSummary().to_dict(), "excluded": True})


def _to_convert(layout: Layout, mine: list[int], checksum: bool) -> list[int]:
    """The inputs of ``mine`` to (re)convert: those with no summary, those an earlier run
    skipped, and those whose shards no longer match their records (named)."""
    todo = []
    for j in mine:
        earlier = _read(layout.input_summary(j))
        if earlier is None or earlier.get("excluded"):
            todo.append(j)
            continue
        problems = damaged_shards(layout, earlier, checksum)
        if problems:
            shown = "; ".join(problems[:3]) + (
                f" and {len(problems) - 3} more" if len(problems) > 3 else ""
            )
            print(
                f"input {j} ({layout.inputs[j]}) was complete but {len(problems)} of its shards "
                f"are damaged ({shown}): converting it again (its good shards are kept)",
                file=sys.stderr,
            )
            if len(layout.inputs) > 1:
                layout.input_summary(j).unlink()
            layout.merged.unlink(missing_ok=True)
            todo.append(j)
    return todo


def convert(
    build: Build, args: argparse.Namespace, inputs: list[str], input_option: str, desc: str
) -> dict[str, Any] | None:
    """Convert ``inputs`` (named by the option ``input_option``; see the module docstring);
    returns the merged summary, or None while other parts still have inputs to do. Prints
    the report."""
    if args.items_per_shard < 1:
        raise ValueError(f"--items-per-shard must be >= 1, got {args.items_per_shard}")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    part, parts = parse_part(args.part)
    layout = Layout(Path(args.out), args.prefix, tuple(inputs))
    options = settings(args, input_option)
    excluded = _skipped_inputs(args, inputs)

    def manifest_of(j: int) -> dict[str, Any]:
        return {"input": inputs[j], "index": j, "inputs": len(inputs), "settings": options}

    mine = [j for j in range(len(inputs)) if j % parts == part]
    _check_earlier(layout, manifest_of, mine)
    layout.out.mkdir(parents=True, exist_ok=True)
    (layout.out / RECORDS).mkdir(exist_ok=True)
    for j in mine:
        if j in excluded:
            _exclude(layout, j, manifest_of(j))
    checksum = getattr(args, "verify", "size") == "checksum"
    todo = _to_convert(layout, [j for j in mine if j not in excluded], checksum)
    print(
        f"{len(inputs)} inputs; this part ({part}/{parts}): {len(mine)}, "
        f"{len(mine) - len(todo) - len(excluded & set(mine))} complete from an earlier run, "
        f"{len(excluded & set(mine))} skipped (--skip-input), {len(todo)} to convert "
        f"with {min(args.workers, max(len(todo), 1))} process(es)",
        file=sys.stderr,
    )

    def task(j: int) -> Task:
        return Task(build, args, layout, j, manifest_of(j), desc, progress=len(todo) == 1)

    bar = tqdm(total=len(todo), desc=f"{desc}: inputs", unit="input", disable=len(todo) <= 1)
    if args.workers == 1 or len(todo) == 1:
        for j in todo:
            _convert_one(task(j))
            bar.update()
    else:
        run_all(_convert_one, [task(j) for j in todo], args.workers, lambda _: bar.update())
    bar.close()
    merged = try_merge(layout)
    if merged is None:
        done = sum(layout.input_summary(j).exists() for j in range(len(inputs)))
        print(
            f"\n{layout.out}: part {part}/{parts} is complete; {done} of {len(inputs)} inputs "
            f"are. Once the other parts are done, the last one merges the summaries (or run "
            f"python -m data_prep.corpus --out {layout.out} --prefix {layout.prefix})"
        )
        return None
    print(f"\n{layout.out}:\n{report(merged)}")
    check_skip_ratio(merged, getattr(args, "max_skip_ratio", 1.0))
    return merged


@dataclass(frozen=True)
class Conversion:
    """A converter's command line, parsed, with its inputs listed: what a run converts, or a
    part of one (a datatrove task, data_prep/pipeline.py)."""

    build: Build
    args: argparse.Namespace
    inputs: tuple[str, ...]
    option: str
    """The option that named the inputs (resume compares the inputs one by one instead)."""
    desc: str

    def run(self, part: tuple[int, int] | None = None) -> dict[str, Any] | None:
        """Convert (see :func:`convert`); ``part=(I, N)``: only what ``--part I/N`` would,
        in this process."""
        args = self.args
        if part is not None:
            args = argparse.Namespace(
                **{**vars(args), "part": f"{part[0]}/{part[1]}", "workers": 1}
            )
        return convert(self.build, args, list(self.inputs), self.option, self.desc)

    def input_summaries(self, part: int, parts: int) -> list[dict[str, Any]]:
        """The summaries of the complete inputs of part ``part`` of ``parts``."""
        layout = Layout(Path(self.args.out), self.args.prefix, self.inputs)
        found = (_read(layout.input_summary(j)) for j in range(part, len(self.inputs), parts))
        return [s for s in found if s is not None]


def parse_command(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    prepare: Callable[[argparse.Namespace], Conversion],
) -> Conversion:
    """A converter's command line as a :class:`Conversion`; a bad one ends with the
    converter's usage and the reason (exit status 2), as argparse does."""
    args = parser.parse_args(argv)
    try:
        return prepare(args)
    except ValueError as e:
        parser.error(str(e))


def run_command(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    prepare: Callable[[argparse.Namespace], Conversion],
) -> None:
    """A converter's ``main``: parse, convert, and end a bad input with the usage too."""
    conversion = parse_command(parser, argv, prepare)
    try:
        conversion.run()
    except ValueError as e:
        parser.error(str(e))


SKIP_EXIT = 3
"""The exit status of a conversion that skipped more than ``--max-skip-ratio`` of its items."""


def check_skip_ratio(summary: dict[str, Any], limit: float) -> None:
    """End the command with :data:`SKIP_EXIT` when more than ``limit`` of the items were
    skipped, naming the reasons (the shards and summaries are written first)."""
    skipped = sum(summary["skipped"].values())
    items = skipped + summary["samples_written"] + summary["samples_reused"]
    if not items or skipped / items <= limit:
        return
    reasons = ", ".join(f"{r} {n}" for r, n in Counter(summary["skipped"]).most_common())
    top = Counter(summary["skipped"]).most_common(1)[0][0]
    example = summary.get("skipped_examples", {}).get(top, [])
    print(
        f"error: {skipped} of {items} items were skipped ({skipped / items:.0%}, above "
        f"--max-skip-ratio {limit:g}): {reasons}"
        + (f" (e.g. {example[0]})" if example else "")
        + ". Check the inputs (an --image-root, a format), or pass --max-skip-ratio 1 to "
        "accept it",
        file=sys.stderr,
    )
    raise SystemExit(SKIP_EXIT)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.corpus",
        description="Merge the per-input summaries of a conversion (run by several machines "
        "or processes) into PREFIX-summary.json, or list the inputs still missing.",
    )
    parser.add_argument("--out", type=Path, required=True, help="the converters' --out")
    parser.add_argument("--prefix", required=True, help="the converters' --prefix")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = make_parser()
    args = parser.parse_args(argv)
    found = sorted(args.out.glob(f"{args.prefix}-[0-9][0-9][0-9][0-9][0-9]-summary.json"))
    summaries = [s for p in found if (s := _read(p)) is not None]
    if not summaries:
        parser.error(f"{args.out} holds no {args.prefix}-NNNNN-summary.json")
    count = summaries[0]["inputs"]
    by_index = {s["index"]: s for s in summaries}
    missing = [j for j in range(count) if j not in by_index]
    if missing:
        shown = ", ".join(f"{j:05d}" for j in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        print(f"{len(missing)} of {count} inputs are not complete: {shown}{more}")
        sys.exit(1)
    merged = merge([by_index[j] for j in range(count)])
    write_json(args.out / f"{args.prefix}-summary.json", merged)
    print(f"{args.out}:\n{report(merged)}")


if __name__ == "__main__":
    main()
