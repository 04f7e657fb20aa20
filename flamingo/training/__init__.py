"""The training wing: what ``train.py`` (and the benchmarks) run a model with.

``engine`` (plain PyTorch or DeepSpeed ZeRO; the only module that imports deepspeed),
``batches`` (a step's micro-batches from every dataset, epochs, running out), ``checkpoints``
(the run state's owner and the checkpoint folder protocol), ``runlog`` (metric files). It
builds on the library (``flamingo`` and ``flamingo.data``), which never imports it.
"""
