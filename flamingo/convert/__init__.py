"""Foreign checkpoint formats -> flamingo checkpoints, one module per format.

    python -m flamingo.convert openflamingo checkpoint.pt out_dir --config configs/model/openflamingo-3b.yaml

A new format gets a module here (``from_<format>(source, cfg) -> Flamingo``) and a sub-command
in ``__main__``; the result is written with ``Flamingo.save_pretrained`` and loads with
``Flamingo.from_pretrained``.
"""

from flamingo.convert.openflamingo import from_openflamingo

__all__ = ["from_openflamingo"]
