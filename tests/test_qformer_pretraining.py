"""BLIP-2's stage 1: the Q-Former's text side against transformers' ``Blip2ForImageTextRetrieval``
(ITM logits, ITC similarities), the ITG mask's locality, and the three losses training."""

from __future__ import annotations

import pytest
import torch
from transformers import BertTokenizer, Blip2Config, Blip2ForImageTextRetrieval

from flamingo.convert.blip2 import load_stage1
from flamingo.vision import to_tensor
from tests.helpers import noise_image
from tests.test_blip2 import IMAGE_SIZE, VISION

QUERIES = 4
WORDS = "a cat dog red blue sits on the mat and runs".split()


def bert_tokenizer(directory):
    """A WordPiece tokenizer over a few words, with BLIP-2's [DEC] as its BOS."""
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (directory / "vocab.txt").write_text("\n".join(specials + WORDS) + "\n")
    tokenizer = BertTokenizer(str(directory / "vocab.txt"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def save_retrieval(tmp_path, every: int = 2, seed: int = 0):
    """A random ``Blip2ForImageTextRetrieval``, its norms and biases moved, saved with its
    tokenizer by transformers: (model, directory, tokenizer)."""
    directory = tmp_path / f"itm-{every}"
    tokenizer = bert_tokenizer(directory)
    config = Blip2Config(
        vision_config=VISION,
        qformer_config=dict(
            hidden_size=16,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=40,
            cross_attention_frequency=every,
            vocab_size=len(tokenizer),
            max_position_embeddings=24,
            use_qformer_text_input=True,
        ),
        num_query_tokens=QUERIES,
        image_text_hidden_size=12,
    )
    torch.manual_seed(seed)
    reference = Blip2ForImageTextRetrieval(config).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif p.ndim >= 2:
                p.normal_(0.0, 0.3)
    reference.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return reference, directory, tokenizer


def inputs(model, tokenizer, texts=("a cat sits on the mat", "red dog", "blue")):
    images = [noise_image(s, (IMAGE_SIZE, IMAGE_SIZE)) for s in range(len(texts))]
    pixels = torch.stack([to_tensor(image, model.vision.cfg) for image in images])
    text = tokenizer(list(texts), padding=True, return_tensors="pt")
    return pixels, text["input_ids"], text["attention_mask"]


@pytest.mark.parametrize("every", [1, 2])
def test_itm_logits_and_itc_similarities_equal_transformers(tmp_path, every):
    reference, directory, tokenizer = save_retrieval(tmp_path, every)
    ours = load_stage1(directory)
    pixels, ids, mask = inputs(ours, tokenizer)
    assert mask[2, -1] == 0 and ids[0, 0] == tokenizer.cls_token_id  # padded, [CLS] first
    with torch.no_grad():
        itm = reference(pixels, ids, mask, use_image_text_matching_head=True).logits_per_image
        itc = reference(pixels, ids, mask).logits_per_image
        vision = ours.vision_tokens(pixels)
        got_itm = ours.match_logits(vision, ids, mask)
        got_itc = ours.similarity(vision, ids, mask)
        other = ours.match_logits(vision.flip(0), ids, mask)
    assert got_itm.shape == itm.shape == (3, 2) and got_itc.shape == itc.shape == (3, 3)
    assert (got_itm - itm).abs().max().item() <= 1e-4
    assert (got_itc - itc).abs().max().item() <= 1e-4
    assert (other - got_itm).abs().max().item() > 1e-2  # the images matter
    assert ours.vocab.dec == tokenizer.bos_token_id


def test_a_generated_token_sees_the_queries_and_earlier_text_only(tmp_path):
    _, directory, tokenizer = save_retrieval(tmp_path)
    model = load_stage1(directory)
    pixels, ids, mask = inputs(model, tokenizer, ("a cat sits on the mat", "red dog runs"))
    with torch.no_grad():
        vision = model.vision_tokens(pixels)
        logits = model.generation_logits(vision, ids, mask)
        later = ids.clone()
        later[:, 3] = tokenizer.convert_tokens_to_ids("blue")
        changed = model.generation_logits(vision, later, mask)
        other_image = model.generation_logits(vision.flip(0), ids, mask)
    assert logits.shape == (2, ids.shape[1], len(tokenizer))
    torch.testing.assert_close(changed[:, :3], logits[:, :3])  # before the change: untouched
    assert (changed[:, 3:] - logits[:, 3:]).abs().max() > 1e-3
    assert (other_image - logits).abs().amax(-1).min() > 1e-3  # every position reads the image


def test_the_temperature_is_clamped_and_still_learns(tmp_path):
    _, directory, _ = save_retrieval(tmp_path)
    model = load_stage1(directory)
    for value, expected in ((1.0, 0.5), (0.0001, 0.001), (0.07, 0.07)):
        with torch.no_grad():
            model.temp.value.fill_(value)
        t = model.temp()
        assert t.item() == pytest.approx(expected)
        (3 * t).backward()
        assert model.temp.value.grad.item() == pytest.approx(3.0)  # passed through at a bound
        model.temp.value.grad = None


def test_the_three_losses_fall_and_only_the_q_former_side_learns(tmp_path):
    _, directory, tokenizer = save_retrieval(tmp_path)
    model = load_stage1(directory).train()
    pixels, ids, mask = inputs(model, tokenizer, ("a cat sits", "red dog runs", "blue mat", "the"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in model.vision.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first = model(pixels, ids, mask, generator=g)
    assert torch.isfinite(first.loss) and first.loss == first.itc + first.itm + first.itg
    first.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []  # every head, the text side and the temperature take part
    optimizer.step()
    for _ in range(60):
        optimizer.zero_grad()
        model(pixels, ids, mask, generator=g).loss.backward()
        optimizer.step()
    model.eval()  # no dropout: the losses themselves
    with torch.no_grad():
        last = model(pixels, ids, mask, generator=g)
    assert last.itc < first.itc and last.itg < 0.5 * first.itg and last.itm < first.itm


def test_a_stage2_checkpoint_is_refused_with_the_field(tmp_path):
    reference, directory, _ = save_retrieval(tmp_path)
    config = (directory / "config.json").read_text()
    (directory / "config.json").write_text(
        config.replace('"use_qformer_text_input": true', '"use_qformer_text_input": false')
    )
    with pytest.raises(ValueError, match="use_qformer_text_input"):
        load_stage1(directory)


def test_the_loaders_pairs_become_cls_and_caption():
    from flamingo.losses import make_labels
    from flamingo.processing import FlamingoProcessor
    from flamingo.qformer_pretraining import QFormerPretraining
    from tests.helpers import tiny_config
    from tests.test_blip2 import QFORMER

    cfg = tiny_config(*QFORMER)
    processor = FlamingoProcessor.from_config(cfg)
    model = QFormerPretraining.from_config(cfg, processor.tokenizer)
    image = noise_image(0)
    enc = processor(
        ["<image>a red circle<|endofchunk|>", "<image>blue<|endofchunk|>"], [[image]] * 2
    )
    labels = make_labels(enc["input_ids"], enc["attention_mask"], processor.special_tokens)
    ids, mask = model.texts(enc["input_ids"], labels)
    tok = processor.tokenizer
    for row, caption in enumerate(["a red circle", "blue"]):
        expected = [model.vocab.cls, *tok(caption, add_special_tokens=False)["input_ids"]]
        expected.append(processor.special_tokens.end_of_chunk_id)
        n = int(mask[row].sum())
        assert ids[row, :n].tolist() == expected
        assert not ids[row, n:].any()
    assert model.vocab.cls == len(tok) and model.vocab.dec == len(tok) + 1
