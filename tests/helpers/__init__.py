"""What the tests share that is not a fixture: the tiny configs (the model's, and each preset's
overrides), small builders and images, the Hub-cache layout. Fixtures live in conftest.py."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import torch
from PIL import Image

from flamingo import Flamingo, FlamingoConfig

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "model" / "tiny.yaml"


def free_port() -> str:
    """A TCP port nothing listens on now, for a launcher's rendezvous (fixed ports collide
    when two suites run on one machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def tiny_config(*overrides: str) -> FlamingoConfig:
    return FlamingoConfig.from_yaml(TINY, overrides=list(overrides))


def build(*overrides: str, seed: int = 0) -> Flamingo:
    torch.manual_seed(seed)
    return Flamingo.from_config(tiny_config(*overrides)).eval()


GATES = ("attn_gate", "ff_gate", "mlp_gate")
"""The tanh gates' names in the fusions' blocks (Flamingo's ``attn_gate``/``ff_gate``, Llama 3.2
Vision's ``cross_attn_attn_gate``/``cross_attn_mlp_gate``)."""


def set_gates(model: Flamingo, value: float = 0.7) -> None:
    """Open the tanh gates so that images influence the text (they start at 0)."""
    with torch.no_grad():
        for name, gate in model.lm.gated_blocks.named_parameters():
            if name.endswith(GATES):
                gate.fill_(value)


def padded(enc: dict) -> torch.Tensor:
    """A batch's flat media (``pixel_values`` with ``media_slots``) in the padded layout
    (B, N, F, C, H, W), zero-filled slots: what ``Flamingo.encode_media`` also accepts."""
    from flamingo.media import place_in_slots

    return place_in_slots(enc["pixel_values"], enc["media_slots"])


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (40, 32)) -> Image.Image:
    return Image.new("RGB", size, colour)


def noise_image(seed: int, size: tuple[int, int] = (32, 32)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(arr.numpy())


COMMIT = "a" * 40
OTHER = "b" * 40


def lay_out(cache, repo_id: str, source, commit: str = COMMIT, main: bool = True) -> None:
    """``source``'s files as the snapshot ``commit`` of ``repo_id`` in a Hub cache (blobs,
    snapshot links, and ``refs/main`` when ``main``)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    for path in files:
        name = path.name if source.is_file() else str(path.relative_to(source))
        blob = repo / "blobs" / f"{commit[:8]}-{name.replace('/', '-')}"
        shutil.copy(path, blob)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(blob)
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)


def tokenizer_with_image(bos: bool = False):
    """The packaged tiny tokenizer with ``<image>`` and ``<pad>`` added, as the ``llava-hf`` and
    BLIP-2 repos' tokenizers have them (their LMs hold the rows), padding on the left. With
    ``bos``, it starts every text with its start token, as OPT's (``</s>``) and Llama's do."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from flamingo.tokens import IMAGE, TINY_TOKENIZER_DIR

    tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE], "pad_token": "<pad>"})
    tokenizer.padding_side = "left"
    if bos:
        start = tokenizer.bos_token
        tokenizer._tokenizer.post_processor = TemplateProcessing(
            single=f"{start} $A",
            pair=f"{start} $A $B",
            special_tokens=[(start, tokenizer.bos_token_id)],
        )
    return tokenizer


PRESET_OVERRIDES: dict[str, tuple[str, ...]] = {
    "flamingo": (),
    "llava": ("connector=llava", "vision.feature_layer=-2", "vision.ln_post_on_tokens=false"),
    "qformer": (
        *("connector=qformer", "vision.cls_token=true", "qformer.queries=8", "qformer.layers=2"),
        *("qformer.width=32", "qformer.heads=2", "qformer.intermediate=64"),
    ),
    "mllama": (
        *("connector=mllama", "vision.kind=mllama", "vision.image_size=16", "mllama.layers=[0, 1]"),
        "vision.architecture={image_size: 16, patch_size: 8, hidden_size: 16, "
        "intermediate_size: 32, num_hidden_layers: 2, num_global_layers: 1, attention_heads: 2, "
        "max_num_tiles: 2, vision_output_dim: 32, intermediate_layers_indices: [0], "
        "supported_aspect_ratios: [[1, 1], [1, 2], [2, 1]]}",
        "projector.layers=1",
    ),
}
"""Each preset (``connector:``) on the tiny model: the overrides of ``configs/model/tiny.yaml``
its parts need (LLaVA's second-to-last layer without the final norm; a small Q-Former; Llama 3.2
Vision's tiled tower, two 16-pixel tiles at most, and its cross-attention layers before both of
the tiny Llama's layers)."""


TINY_CLIP_VISION = dict(
    model_type="clip_vision_model",
    hidden_size=24,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=28,
    patch_size=7,
)
"""transformers' CLIP vision tower, tiny: the LLaVA references' (and the pixel tests')."""

TINY_LLAMA = dict(
    model_type="llama",
    hidden_size=32,
    intermediate_size=44,
    num_hidden_layers=2,
    num_attention_heads=4,
)
"""A tiny Llama text config for the references (each adds its vocabulary and ids)."""

TINY_OPT = dict(
    model_type="opt",
    hidden_size=32,
    ffn_dim=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    word_embed_proj_dim=32,
)
"""A tiny OPT text config for the BLIP-2 references (each adds its vocabulary and ids)."""
