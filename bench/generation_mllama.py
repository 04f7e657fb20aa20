"""``bench.generation --against mllama``: ours vs transformers' ``MllamaForConditionalGeneration``
``generate`` on the same random Llama 3.2 Vision weights and prompts, greedy or beam search,
tokens compared (neither side stops early, so both beam searches keep the ``num_beams`` best
of the same candidates at every step and return the best sequence of the full length).

The prompts open with an image and every row has as many (4-shot captioning, ``<|image|>`` per
image), so no token reads nothing and no image slot is empty: the two semantics of text before
the first image (``mllama.rows_without_image``) give the same tokens there, and so do ours and
transformers'.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MLLAMA_SHAPES = {
    "tiny": dict(
        vision=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_global_layers=1,
            attention_heads=4, image_size=56, patch_size=14, max_num_tiles=4,
            vision_output_dim=192, intermediate_layers_indices=[0, 1],
        ),
        text=dict(
            hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, cross_attention_layers=[1, 4],
        ),
    ),
    "small": dict(
        vision=dict(
            hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_global_layers=2,
            attention_heads=8, image_size=112, patch_size=14, max_num_tiles=4,
            vision_output_dim=768, intermediate_layers_indices=[1, 3],
        ),
        text=dict(
            hidden_size=512, intermediate_size=1536, num_hidden_layers=10, num_attention_heads=8,
            num_key_value_heads=2, cross_attention_layers=[3, 8],
        ),
    ),
}  # fmt: skip
"""Random Llama 3.2 Vision models (11B's proportions, scaled down: a cross-attention layer after
every few self-attention layers, grouped-query attention, 4 tiles)."""


def build_mllama(config: str, root: Path):
    """A random Llama 3.2 Vision of :data:`MLLAMA_SHAPES` (gates open), written by transformers
    to ``root`` with a tokenizer and image processor, and ours converted from that directory:
    ``(ours, reference, directory)``."""
    from transformers import (
        AutoTokenizer,
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaImageProcessor,
    )

    from flamingo import Flamingo
    from flamingo.tokens import MLLAMA_IMAGE, TINY_TOKENIZER_DIR

    if config not in MLLAMA_SHAPES:
        raise SystemExit(f"--against mllama takes --config {' or '.join(MLLAMA_SHAPES)}")
    shape = MLLAMA_SHAPES[config]
    tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "pad_token": "<pad>"})
    tok.add_special_tokens({"additional_special_tokens": [MLLAMA_IMAGE]})
    tok.padding_side = "left"
    image_id = tok.convert_tokens_to_ids(MLLAMA_IMAGE)
    text = dict(
        shape["text"], vocab_size=image_id, max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    reference = MllamaForConditionalGeneration(
        MllamaConfig(vision_config=shape["vision"], text_config=text, image_token_index=image_id)
    ).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "gate" in name:
                p.fill_(0.5)
    reference.save_pretrained(root)
    tok.save_pretrained(root)
    size = shape["vision"]["image_size"]
    MllamaImageProcessor(size={"height": size, "width": size}).save_pretrained(root)
    return Flamingo.from_pretrained(root), reference, root


def mllama_prompts(batch: int, shots: int = 4) -> tuple[list[str], list[list[Image.Image]]]:
    """4-shot captioning in Llama 3.2's form, each row's images of other sizes (tilings)."""
    rng = np.random.default_rng(1)

    def image():
        h, w = rng.integers(40, 200, 2)
        return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

    text = "".join(f"<|image|>Output: a photo of thing {i}.\n" for i in range(shots))
    text += "<|image|>Output:"
    return [text] * batch, [[image() for _ in range(shots + 1)] for _ in range(batch)]


def against_mllama(args, timed) -> tuple[dict, dict]:
    """Time ours and transformers' ``generate`` on the same weights and prompts."""
    from transformers import MllamaProcessor

    from flamingo import FlamingoProcessor

    with tempfile.TemporaryDirectory() as tmp:
        ours, reference, directory = build_mllama(args.config, Path(tmp))
        texts, images = mllama_prompts(args.batch)
        theirs = MllamaProcessor.from_pretrained(directory)(
            images=images, text=texts, return_tensors="pt", padding=True, padding_side="left"
        )
        mine = FlamingoProcessor.from_pretrained(directory)(texts, images)
    if not torch.equal(mine["input_ids"], theirs["input_ids"]):
        raise SystemExit("the two processors built different input_ids")
    device, new, beams = args.device, args.new, args.beams
    ours, reference = ours.to(device), reference.to(device)
    reference.generation_config.eos_token_id = None  # neither side stops: all `new` tokens
    mine = {k: v.to(device) for k, v in mine.items()}
    theirs = {k: v.to(device) for k, v in theirs.items()}
    runs = (
        (
            "ours",
            lambda: ours.generate(**mine, max_new_tokens=new, num_beams=beams, eos_token_id=-1)[
                :, -new:
            ],
        ),
        (
            "mllama",
            lambda: reference.generate(
                **theirs, max_new_tokens=new, num_beams=beams, do_sample=False
            )[:, -new:],
        ),
    )
    return timed(runs, device, warm_up=True)
