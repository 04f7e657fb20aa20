"""Stage 2: next-token pretraining of a tiny Hugging Face causal LM on the toy world's text.

    python -m demo.pretrain_lm --config configs/demo/lm.yaml [key=value ...]

Packs the corpus (one text per line, each ended by the tokenizer's EOS) into ``seq_len``-token
sequences, trains with AdamW, and writes the model and its tokenizer with ``save_pretrained``
so that a Flamingo model config names the directory as ``lm.name_or_path``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from demo.common import cli, summary, warmup_cosine
from flamingo.tokens import TINY_TOKENIZER, TINY_TOKENIZER_DIR
from flamingo.typed_config import YamlConfig


@dataclass(frozen=True)
class LMPretrainConfig(YamlConfig):
    corpus: str
    """Text file, one document per line."""
    output_dir: str
    """Where the model and tokenizer are saved."""
    architecture: dict
    """Inline Hugging Face config (model_type and sizes)."""
    tokenizer: str = TINY_TOKENIZER
    """Tokenizer directory, or ``tiny`` for the packaged one."""
    seq_len: int = 64
    batch_size: int = 32
    steps: int = 300
    lr: float = 3e-3
    warmup_steps: int = 20
    seed: int = 0


def packed_sequences(corpus: Path, tokenizer, seq_len: int) -> torch.Tensor:
    ids: list[int] = []
    for line in corpus.read_text().splitlines():
        if line.strip():
            ids += tokenizer(line.strip())["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // seq_len
    if n < 2:
        raise ValueError(f"{corpus}: only {len(ids)} tokens, fewer than two sequences of {seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def pretrain(cfg: LMPretrainConfig) -> dict:
    from transformers import AutoTokenizer

    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(
        str(TINY_TOKENIZER_DIR) if cfg.tokenizer == TINY_TOKENIZER else cfg.tokenizer
    )
    data = packed_sequences(Path(cfg.corpus), tokenizer, cfg.seq_len)
    arch = dict(cfg.architecture)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(arch.pop("model_type"), **arch)
    ).train()
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ValueError(
            f"architecture.vocab_size must be >= the tokenizer's {len(tokenizer)} tokens"
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    rng = random.Random(cfg.seed)
    losses = []
    for step in tqdm(range(cfg.steps), desc="stage 2: LM"):
        lr = warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = data[[rng.randrange(len(data)) for _ in range(cfg.batch_size)]]
        logits = model(input_ids=batch).logits
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    out = Path(cfg.output_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    result = summary(losses, sequences=len(data), steps=cfg.steps)
    (out / "pretrain_summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    cli("python -m demo.pretrain_lm", __doc__, LMPretrainConfig, pretrain, argv)


if __name__ == "__main__":
    main()
