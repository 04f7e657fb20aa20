"""Build the small byte-level BPE tokenizer shipped in ``flamingo/assets/tiny_tokenizer``.

The tokenizer lets ``configs/model/tiny.yaml`` (tests, the demo, CPU runs) work with no network.
It is trained on a deterministic synthetic corpus about shapes, colours, positions, counts and
motion (the vocabulary of the toy world) plus common English function words, so short captions
and questions tokenize into few tokens. Byte-level BPE covers any input text.

It deliberately contains no ``<image>`` / ``<|endofchunk|>`` tokens: like any Hugging Face
tokenizer, those are added by :func:`flamingo.tokens.add_special_tokens` when a model is built.

Usage: ``python -m data_prep.build_tiny_tokenizer [--out flamingo/assets/tiny_tokenizer]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

COLOURS = "red green blue yellow orange purple pink brown black white gray cyan".split()
SHAPES = "circle square triangle star cross diamond hexagon heart ring rectangle".split()
SIZES = "small large big tiny medium".split()
POSITIONS = "left right top bottom center middle corner upper lower".split()
MOTIONS = "up down left right diagonally across moving moves".split()
NUMBERS = "zero one two three four five six seven eight nine ten".split()
TEMPLATES = [
    "a {size} {colour} {shape} on the {pos}.",
    "there is a {colour} {shape} in the {pos} of the image.",
    "Question: what colour is the {shape}? Short answer: {colour}",
    "Question: what shape is {colour}? Short answer: {shape}",
    "Question: how many shapes are there? Short answer: {number}",
    "Question: where is the {colour} {shape}? Short answer: {pos}",
    "Question: which way does the {shape} move? Short answer: {motion}",
    "Output: {number} shapes: a {colour} {shape} and a {size} {shape2}.",
    "A video of a {colour} {shape} moving {motion}.",
    "The picture shows a {size} {colour} {shape} next to a {colour2} {shape2}.",
    "This is an image of {number} {colour} {shape}s.",
    "Here we see the {shape} at the {pos}, and it is {colour}.",
]
ENGLISH = (
    "the of and to in is was it for on with as at by this that from are be or an have has "
    "not but they which you we he she his her their its one all would there what so up out if "
    "about who get go me when make can like time no just him know take people into year your "
    "good some could them see other than then now look only come over think also back after "
    "use how our work first well way even new want because any these give day most us photo "
    "image picture video caption answer question yes no Output Question Short"
).split()


def corpus(num_lines: int, seed: int = 0) -> list[str]:
    """Deterministic training text for the tokenizer."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        template = rng.choice(TEMPLATES)
        lines.append(
            template.format(
                size=rng.choice(SIZES),
                colour=rng.choice(COLOURS),
                colour2=rng.choice(COLOURS),
                shape=rng.choice(SHAPES),
                shape2=rng.choice(SHAPES),
                pos=rng.choice(POSITIONS),
                motion=rng.choice(MOTIONS),
                number=rng.choice(NUMBERS),
            )
        )
    for a, b in itertools.pairwise(ENGLISH * 4):
        lines.append(f"{a} {b} {a.capitalize()} {b}.")
    return lines


def build(out: Path, vocab_size: int = 1024) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(20_000), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=2048,
    )
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    # transformers 5 names the class TokenizersBackend, which 4.x cannot resolve; both resolve
    # PreTrainedTokenizerFast (5.x keeps it as an alias), so the asset loads across the range.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {out} (vocab {len(fast)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[1] / "flamingo" / "assets" / "tiny_tokenizer"
    parser.add_argument("--out", type=Path, default=default, help="output directory")
    parser.add_argument("--vocab-size", type=int, default=1024)
    args = parser.parse_args()
    build(args.out, args.vocab_size)


if __name__ == "__main__":
    main()
