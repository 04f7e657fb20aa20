"""Training data: webdataset shards of image-text pairs, interleaved documents and video.

``schema`` fixes what a shard holds (shared by the converters in ``data_prep/`` and the
loaders), ``images`` decodes and augments images robustly, ``shards`` writes and reads tar
shards, ``pipeline`` turns shards into Flamingo batches with exact resume.

This package imports webdataset; ``import flamingo`` does not import it.
"""
