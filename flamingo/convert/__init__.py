"""Foreign checkpoint formats -> flamingo checkpoints, one module per format.

    python -m flamingo.convert openflamingo checkpoint.pt out_dir --config configs/model/openflamingo-3b.yaml

A new format gets a module here, which maps its tensors into a built model
(``load_<format>(model, source)``; it never imports ``flamingo.model``, which loads foreign
checkpoints by Hub id through it), a ``Flamingo.from_<format>`` builder and a sub-command in
``__main__``; the result is written with ``Flamingo.save_pretrained`` and loads with
``Flamingo.from_pretrained``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flamingo.config import FlamingoConfig
    from flamingo.model import Flamingo


def from_openflamingo(state_dict_or_path, cfg: FlamingoConfig) -> Flamingo:
    """Our model built from ``cfg`` with an OpenFlamingo checkpoint loaded into it
    (:meth:`flamingo.model.Flamingo.from_openflamingo`)."""
    from flamingo.model import Flamingo

    return Flamingo.from_openflamingo(state_dict_or_path, cfg)


__all__ = ["from_openflamingo"]
