"""Flamingo's stage 1, the contrastive vision tower, through open_clip's own trainer.

    torchrun --nproc_per_node 8 -m flamingo.training.clip_stage <open_clip_train flags>

runs ``open_clip_train.main`` with its flags unchanged, plus one repair it needs on the webdataset
releases this project supports: webdataset >= 0.2.96 ends each tar with an ``eof_value`` sample
(``{}``) that open_clip_train's ``group_by_keys_nothrow`` reads as a file and fails on
(``KeyError: 'fname'``; webdataset issue 384, open_clip issue 935). ``repaired`` swaps in a
``tarfile_to_samples_nothrow`` that asks for no such sample. It is a function of this module,
so DataLoader workers started by ``spawn`` or ``forkserver`` (which re-import modules rather
than copy the patched ones) find it too. The checkpoint it writes
(``<logs>/<name>/checkpoints/epoch_N.pt``) loads as a frozen tower with ``vision.pretrained``
set to the file.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
from collections.abc import Iterator


def tarfile_to_samples(src, handler=None):
    """open_clip_train's tar-to-samples step without webdataset's end-of-tar sample."""
    from open_clip_train import data
    from webdataset.tariterators import tar_file_expander, url_opener

    handler = handler or data.log_and_continue
    kwargs = {}
    if "eof_value" in inspect.signature(tar_file_expander).parameters:  # webdataset >= 0.2.96
        kwargs["eof_value"] = None
    files = tar_file_expander(url_opener(src, handler=handler), handler=handler, **kwargs)
    return data.group_by_keys_nothrow(files, handler=handler)


@contextlib.contextmanager
def repaired(in_order: bool = False) -> Iterator[None]:
    """open_clip_train with ``tarfile_to_samples`` in place and, on leaving, logging as it was
    (``main`` adds handlers to the root logger and sets every logger's level).

    ``in_order`` turns its sample shuffle buffer (5000 samples) into one sample: each drawn shard
    is read in order, so a batch holds consecutive samples (the toy world's twins)."""
    from open_clip_train import data

    saved = {
        name: getattr(data, name)
        for name in (
            "tarfile_to_samples_nothrow",
            "_SAMPLE_SHUFFLE_SIZE",
            "_SAMPLE_SHUFFLE_INITIAL",
        )
    }
    root = logging.getLogger()
    handlers = list(root.handlers)
    levels = {name: logging.getLogger(name).level for name in ["", *root.manager.loggerDict]}
    data.tarfile_to_samples_nothrow = tarfile_to_samples
    if in_order:
        data._SAMPLE_SHUFFLE_SIZE = data._SAMPLE_SHUFFLE_INITIAL = 1
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(data, name, value)
        for handler in list(root.handlers):  # a copy: removing while iterating skips some
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def run(args: list[str], in_order: bool = False) -> None:
    """``open_clip_train.main.main(args)``, repaired; an error when it refuses to start."""
    from open_clip_train import main as oc_main

    with repaired(in_order):
        if oc_main.main(args) == -1:  # its answer when the run's folder already holds a log
            raise RuntimeError(
                f"open_clip_train refused to start (is --logs/--name an earlier run's?): {args}"
            )


def main(argv: list[str] | None = None) -> None:
    run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
