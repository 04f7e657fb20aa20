"""Few-shot evaluation on the Flamingo benchmarks (captioning, VQA, classification)."""
