"""Stage 1: contrastive pretraining of a tiny CLIP on the toy world's pairs, with open_clip's own
trainer (``open_clip_train``, installed with open_clip_torch).

    python -m demo.pretrain_clip --config configs/demo/clip.yaml [key=value ...]

The pairs shards are already open_clip_train's webdataset format (``png``/``jpg`` + ``txt``), so
this module only registers the inline ``architecture`` as an open_clip model config, turns the
YAML into open_clip_train's command line (``train_args``) and runs its ``main`` in this process
(``flamingo.training.clip_stage``, which repairs its webdataset reader), then checks retrieval
on held-out pairs.
The checkpoint it writes keeps only the ``state_dict``, like any open_clip checkpoint: a model
config loads it with ``vision.architecture`` = the same architecture and ``vision.pretrained`` =
the file. A real run (LAION-style shards, several GPUs) runs ``flamingo.training.clip_stage``
with open_clip_train's flags; docs/training.md's "Stage 1: the vision tower" gives the command.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from demo.common import cli, summary
from flamingo.config import VisionConfig
from flamingo.data.shards import expand_shards, read_shard
from flamingo.training import clip_stage
from flamingo.typed_config import YamlConfig
from flamingo.vision import image_transform


@dataclass(frozen=True)
class ClipPretrainConfig(YamlConfig):
    shards: str
    """Pairs shards (brace expansion)."""
    output: str
    """Checkpoint file to write; open_clip_train's own run (log, TensorBoard, full checkpoint)
    lands in ``<output's folder>/open_clip_train/<output's stem>``."""
    architecture: dict
    """open_clip model config: embed_dim, vision_cfg, text_cfg (vocab_size 49408)."""
    val_shards: str | None = None
    """Held-out pairs for the retrieval check after training (none: no check)."""
    image_size: int = 64
    context_length: int = 32
    batch_size: int = 64
    steps: int = 300
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.1
    seed: int = 0
    workers: int = 1
    """open_clip_train's DataLoader workers (decoding and augmenting beside the training step)."""
    shuffle_pairs: bool = True
    """open_clip_train's sample shuffle buffer (5000 pairs). False reads each drawn shard in
    order (``clip_stage.repaired(in_order=True)``), so a batch holds consecutive pairs: with the toy world, each scene beside its twin
    (the same scene with one shape changed), in-batch hard negatives."""
    twins: bool = False
    """The val shards hold twins at (2k, 2k+1), as the toy world writes them: the retrieval check
    also reports how often an image prefers its own caption to its twin's."""
    log_every: int = 1
    """Training steps between logged losses."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        # the architecture's values, with open_clip's defaults (CLIPTextCfg, CLIPVisionCfg)
        for name, section, default in (
            ("context_length", "text_cfg", 77),
            ("image_size", "vision_cfg", 224),
        ):
            theirs = self.architecture.get(section, {}).get(name, default)
            if theirs != getattr(self, name):
                raise ValueError(
                    f"{name}={getattr(self, name)} differs from the architecture's "
                    f"{section}.{name}={theirs}"
                )


def train_args(cfg: ClipPretrainConfig, model: str, logs: Path, device: str) -> list[str]:
    """open_clip_train's command line for ``cfg``: ``steps`` batches of ``batch_size`` drawn from
    resampled shards in one epoch, AdamW with warm-up and cosine decay, fp32, no crop (the toy
    world's captions name where each shape sits)."""
    return [
        *("--model", model, "--train-data", cfg.shards, "--dataset-type", "webdataset"),
        *("--dataset-resampled", "--train-num-samples", str(cfg.steps * cfg.batch_size)),
        *("--epochs", "1", "--batch-size", str(cfg.batch_size), "--lr", str(cfg.lr)),
        *("--wd", str(cfg.weight_decay), "--warmup", str(cfg.warmup_steps)),
        *("--precision", "fp32", "--workers", str(cfg.workers), "--seed", str(cfg.seed)),
        *("--aug-cfg", "scale=(1.0,1.0)", "--device", device),
        *("--logs", str(logs), "--name", model, "--report-to", "tensorboard"),
        *("--log-every-n-steps", str(cfg.log_every), "--save-frequency", "1"),
    ]


def logged_losses(run: Path) -> list[float]:
    """The ``train/loss`` scalars open_clip_train wrote to TensorBoard, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    return [event.value for event in events.Scalars("train/loss")]


def load_pairs(spec: str, transform) -> tuple[torch.Tensor, list[str]]:
    images, captions = [], []
    for url in expand_shards(spec):
        for sample in read_shard(url):
            key = next(k for k in sample if k in ("png", "jpg", "jpeg", "webp"))
            images.append(transform(Image.open(io.BytesIO(sample[key])).convert("RGB")))
            captions.append(sample["txt"].decode())
    if not images:
        raise ValueError(f"{spec}: no image-caption pairs")
    return torch.stack(images), captions


@torch.no_grad()
def retrieval(
    image_features: torch.Tensor, text_features: torch.Tensor, twins: bool = False
) -> dict[str, float]:
    """Recall@1 both ways of pair i's image against every caption (and back), in percent; with
    ``twins``, how often an image scores its own caption above its twin's (pairs 2k, 2k+1)."""
    sim = F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    truth = torch.arange(len(sim))
    result = {
        "image_to_text_r1": 100 * (sim.argmax(1) == truth).float().mean().item(),
        "text_to_image_r1": 100 * (sim.argmax(0) == truth).float().mean().item(),
    }
    if twins:
        if len(sim) % 2:
            raise ValueError(f"twins: {len(sim)} pairs, an odd number")
        own, twin = sim.diagonal(), sim[truth, truth ^ 1]
        result["twin_accuracy"] = 100 * (own > twin).float().mean().item()
    return result


def evaluate(model: open_clip.CLIP, cfg: ClipPretrainConfig, spec: str) -> dict[str, float]:
    vision = VisionConfig(
        model_name="toy-clip",
        pretrained=None,
        architecture=cfg.architecture,
        image_size=cfg.image_size,
    )
    images, captions = load_pairs(spec, image_transform(vision))
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=cfg.context_length)
    model = model.eval()
    features = [model.encode_image(images), model.encode_text(tokenizer(captions))]
    return {"val_pairs": len(images), **retrieval(*features, twins=cfg.twins)}


def pretrain(cfg: ClipPretrainConfig) -> dict:
    out = Path(cfg.output)
    model_name = out.stem
    logs = out.parent / "open_clip_train"
    run = logs / model_name
    shutil.rmtree(run, ignore_errors=True)  # open_clip_train will not start over an old run
    logs.mkdir(parents=True, exist_ok=True)
    (logs / f"{model_name}.json").write_text(json.dumps(cfg.architecture, indent=2) + "\n")
    open_clip.add_model_config(logs / f"{model_name}.json")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clip_stage.run(train_args(cfg, model_name, logs, device), in_order=not cfg.shuffle_pairs)
    state = torch.load(run / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=True)
    torch.save({"state_dict": state["state_dict"]}, out)
    losses = logged_losses(run)
    result = summary(losses, steps=cfg.steps, logged_every=cfg.log_every)
    if cfg.val_shards:
        model = open_clip.CLIP(**cfg.architecture)
        model.load_state_dict(state["state_dict"])
        result["val"] = evaluate(model, cfg, cfg.val_shards)
    result["logit_scale"] = math.exp(state["state_dict"]["logit_scale"].item())
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    cli("python -m demo.pretrain_clip", __doc__, ClipPretrainConfig, pretrain, argv)


if __name__ == "__main__":
    main()
