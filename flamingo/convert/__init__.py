"""Foreign checkpoint formats -> our model, one module per format.

    python -m flamingo.convert openflamingo checkpoint.pt out_dir --config configs/model/openflamingo-3b.yaml
    python -m flamingo.convert llava llava-hf/llava-1.5-7b-hf out_dir

A format's module reads its checkpoints' config onto our fields, refusing what it cannot
reproduce by name, and maps their tensors strictly into a built model; it registers both in
:mod:`flamingo.formats` (``register(Format(...))``), which ``Flamingo.from_pretrained``, the
processor, the CLI (``__main__``) and the Hub cache go through. A format module never imports
``flamingo.model``: it is handed the model :func:`flamingo.formats.convert` built. Importing
this package (``import flamingo`` does) registers every format.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flamingo.convert import blip2, idefics, llava, mllama, openflamingo  # noqa: F401  (registration)

if TYPE_CHECKING:
    from flamingo.config import FlamingoConfig
    from flamingo.model import Flamingo


def from_openflamingo(state_dict_or_path, cfg: FlamingoConfig) -> Flamingo:
    """Our model built from ``cfg`` with an OpenFlamingo checkpoint loaded into it
    (:meth:`flamingo.model.Flamingo.from_openflamingo`)."""
    from flamingo.model import Flamingo

    return Flamingo.from_openflamingo(state_dict_or_path, cfg)


__all__ = ["from_openflamingo"]
