"""Video-text clips -> webdataset shards (schema "video"): F frames sampled evenly + caption.

Sources (each a glob or a brace list of folders; each folder is one input):
  --videos DIRS  video files (mp4, webm, avi, mkv, mov) decoded with PyAV, each with a caption
                 file beside it (clip.mp4 + clip.txt), or captions from --captions
  --frames DIRS  one sub-folder per clip holding its frames (sorted by name) and caption.txt

Frames are sampled evenly over the clip (first and last included) and stored as JPEG.
Unreadable videos, clips with fewer frames than --num-frames and empty captions are skipped
and counted.

    python -m data_prep.video --videos clips --num-frames 8 --out shards/video
"""

from __future__ import annotations

import argparse
import functools
import io
from collections import Counter
from pathlib import Path

from PIL import Image

from data_prep.common import add_output_args, read_file, read_table, text_member
from data_prep.corpus import Conversion, Work, expand_inputs, run_command
from flamingo.data.images import decode_image
from flamingo.data.schema import IMAGE_EXTS, SkipSample, encode_video, unique_keys

VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v")


def even_indices(total: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)``, first and last included."""
    if count == 1:
        return [0]
    return [round(i * (total - 1) / (count - 1)) for i in range(count)]


def decode_video_frames(path: Path, count: int) -> list[Image.Image]:
    import av

    try:
        with av.open(str(path)) as container:
            frames = [frame.to_image() for frame in container.decode(video=0)]
    except Exception as e:  # av raises its own error types for broken files
        raise SkipSample("video_decode_error", f"{type(e).__name__}: {e}") from e
    if len(frames) < count:
        raise SkipSample("too_few_frames", f"{len(frames)} < {count}")
    return [frames[i] for i in even_indices(len(frames), count)]


def folder_frames(folder: Path, count: int, max_pixels: int) -> list[Image.Image]:
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower().lstrip(".") in IMAGE_EXTS)
    if len(paths) < count:
        raise SkipSample("too_few_frames", f"{len(paths)} < {count}")
    return [
        decode_image(read_file(paths[i]), max_pixels)[0] for i in even_indices(len(paths), count)
    ]


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


@functools.cache
def read_captions(table: Path | None) -> tuple[dict[str, str], int]:
    """A caption table's ``{video: caption}`` and how many rows it could not use (read once
    per process)."""
    captions: dict[str, str] = {}
    unusable = 0
    for row in read_table(table) if table else ():
        video, caption = row.get("video"), row.get("caption")
        if isinstance(video, str) and isinstance(caption, str):
            captions[video] = caption
        else:  # unreadable, or without a video name and caption string: counted
            unusable += 1
    return captions, unusable


def build(args: argparse.Namespace, inputs: tuple[str, ...], j: int) -> Work:
    """Input j's clips (data_prep/corpus.py runs this per input). The caption table's
    unusable rows are counted once, under the first input."""
    root = Path(inputs[j])
    captions, unusable = read_captions(args.captions)
    if args.videos:
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTS)
        names = [str(p.relative_to(root).with_suffix("")) for p in paths]
    else:
        paths = sorted(p for p in root.iterdir() if p.is_dir())
        names = [p.name for p in paths]
    # clip.mp4 + clip.webm, or a.b/ + a_b/, would share a key: unique_keys tells them apart
    items = list(zip(paths, unique_keys(names, paths), strict=True))

    def encode(item: tuple[Path, str]) -> dict:
        path, key = item
        rel = str(path.relative_to(root))
        sidecar = path / "caption.txt" if args.frames else path.with_suffix(".txt")
        caption = (
            captions.get(f"{root.name}/{rel}")
            or captions.get(rel)
            or (text_member(sidecar.read_bytes()) if sidecar.is_file() else "")
        )
        caption = " ".join(caption.split())
        if not caption:
            raise SkipSample("empty_text", f"no caption for {rel}")
        if args.videos:
            frames = decode_video_frames(path, args.num_frames)
        else:
            frames = folder_frames(path, args.num_frames, args.max_image_pixels)
        return encode_video(key, [jpeg(f) for f in frames], "jpg", caption, {"source": rel})

    input_events = Counter({"caption_rows_unusable": unusable} if unusable and j == 0 else {})
    return Work(items, encode, len(items), input_events=input_events)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.video",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--videos", help="folders of video files (a glob or brace list)")
    source.add_argument("--frames", help="folders of clip folders of frames (glob, braces)")
    parser.add_argument(
        "--captions",
        type=Path,
        help="table (.jsonl/.csv/.parquet) with columns video (the clip's path under its "
        "input folder, or with the folder's name in front: several folders may share names) "
        "and caption",
    )
    parser.add_argument("--num-frames", type=int, default=8, help="frames sampled per clip")
    add_output_args(parser, "video")
    return parser


def prepare(args: argparse.Namespace) -> Conversion:
    if args.num_frames < 1:
        raise ValueError("--num-frames must be >= 1")
    if args.captions and not args.captions.is_file():
        raise ValueError(f"--captions {args.captions} does not exist")
    option = "videos" if args.videos else "frames"
    inputs = expand_inputs(getattr(args, option), "dir")
    return Conversion(build, args, tuple(inputs), option, "video")


def main(argv: list[str] | None = None) -> None:
    run_command(make_parser(), argv, prepare)


if __name__ == "__main__":
    main()
