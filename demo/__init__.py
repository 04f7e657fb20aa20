"""The toy-world demo: the paper's three-stage recipe end to end on a CPU (issue 7).

Stage 1 pretrains the vision tower contrastively (``demo.pretrain_clip``: open_clip_train), stage 2 pretrains
the language model (``demo.pretrain_lm``), stage 3 is ``train.py``; the library knows nothing
of the demo.
"""
