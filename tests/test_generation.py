"""Generation and scoring: caches change nothing, media are encoded once, beams are right."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import build, noise_image, padded, set_gates

PROMPTS = [
    "a picture: <image>Output: a red circle<|endofchunk|><image>Output:",
    "<image>Question: what?",
]


@pytest.fixture
def setup(processor):
    model = build()
    set_gates(model, 1.0)
    enc = processor(PROMPTS, images=[[noise_image(1), noise_image(2)], [noise_image(3)]])
    return model, enc


def count_vision_calls(model) -> list[int]:
    calls = [0]
    model.vision.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_cached_and_uncached_greedy_give_identical_tokens(setup):
    model, enc = setup
    cached = model.generate(**enc, max_new_tokens=8)
    uncached = model.generate(**enc, max_new_tokens=8, use_cache=False)
    assert cached.shape == (2, enc["input_ids"].shape[1] + 8)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, : enc["input_ids"].shape[1]], enc["input_ids"])


def test_greedy_equals_argmax_of_full_forwards(setup):
    model, enc = setup
    out = model.generate(**enc, max_new_tokens=3)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    for _ in range(3):
        with torch.no_grad():
            logits = model(
                ids, mask, pixel_values=enc["pixel_values"], media_slots=enc["media_slots"]
            ).logits[:, -1]
        logits[:, model.special_tokens.image_id] = float("-inf")
        logits[:, model.special_tokens.pad_id] = float("-inf")
        logits[:, model.lm.tokenizer_size :] = float("-inf")
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(out, ids)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_vision_encoder_runs_once_per_call(setup, num_beams):
    model, enc = setup
    calls = count_vision_calls(model)
    model.generate(**enc, max_new_tokens=5, num_beams=num_beams)
    assert calls == [1]


def test_eos_stops_and_pads(setup):
    model, enc = setup
    free = model.generate(**enc, max_new_tokens=6)
    prompt_len = enc["input_ids"].shape[1]
    eos = int(free[0, prompt_len + 1])  # the second token row 0 generates
    out = model.generate(**enc, max_new_tokens=6, eos_token_id=eos)
    row = out[0, prompt_len:]
    first_eos = int((row == eos).nonzero()[0])
    assert first_eos <= 1
    assert (row[first_eos + 1 :] == model.special_tokens.pad_id).all()


def test_image_and_pad_are_never_generated(setup):
    model, enc = setup
    with torch.no_grad():  # make <image> the most likely token everywhere
        model.lm.new_tokens.output_weight()[1].copy_(
            model.lm.hf.get_output_embeddings().weight.sum(0) * 0 + 50
        )
    out = model.generate(**enc, max_new_tokens=4)[:, enc["input_ids"].shape[1] :]
    assert not torch.isin(
        out, torch.tensor([model.special_tokens.image_id, model.special_tokens.pad_id])
    ).any()


def test_sampling_is_reproducible_and_top_k_1_is_greedy(setup):
    model, enc = setup
    a = model.generate(
        **enc, max_new_tokens=5, do_sample=True, generator=torch.Generator().manual_seed(0)
    )
    b = model.generate(
        **enc, max_new_tokens=5, do_sample=True, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(a, b)
    greedy = model.generate(**enc, max_new_tokens=5)
    top1 = model.generate(**enc, max_new_tokens=5, do_sample=True, top_k=1)
    assert torch.equal(top1, greedy)
    nucleus = model.generate(**enc, max_new_tokens=5, do_sample=True, top_p=1e-6)
    assert torch.equal(nucleus, greedy)


def reference_beam_search(model, enc, row, num_beams, max_new_tokens, eos, length_penalty=1.0):
    """Plain beam search: full forwards, Python lists, no caches."""
    ids = enc["input_ids"][row : row + 1]
    mask = enc["attention_mask"][row : row + 1]
    n_media = int((ids == model.special_tokens.image_id).sum())
    pixels = padded(enc)[row : row + 1, :n_media]
    banned = [model.special_tokens.image_id, model.special_tokens.pad_id]
    beams, finished = [([], 0.0)], []
    for step in range(max_new_tokens):
        candidates = []
        for tokens, total in beams:
            full = torch.cat([ids, torch.tensor([tokens], dtype=torch.long)], 1)
            full_mask = torch.cat([mask, torch.ones(1, len(tokens), dtype=torch.long)], 1)
            with torch.no_grad():
                logits = model(full, full_mask, pixel_values=pixels).logits[0, -1]
            logits[banned] = float("-inf")
            logits[model.lm.tokenizer_size :] = float("-inf")
            logprobs = logits.log_softmax(-1)
            candidates += [
                (total + float(lp), tokens + [t]) for t, lp in enumerate(logprobs.tolist())
            ]
        candidates.sort(key=lambda c: -c[0])
        beams = []
        for rank, (total, tokens) in enumerate(candidates[: 2 * num_beams]):
            if tokens[-1] == eos:
                if rank < num_beams:
                    finished.append((total / len(tokens) ** length_penalty, tokens))
            elif len(beams) < num_beams:
                beams.append((tokens, total))
        finished = sorted(finished, key=lambda f: -f[0])[:num_beams]
        best_running = max(total for _, total in beams)
        if (
            len(finished) == num_beams
            and best_running / (step + 1) ** length_penalty <= finished[-1][0]
        ):
            return finished[0][1]
    finished += [(total / len(tokens) ** length_penalty, tokens) for tokens, total in beams]
    return max(finished, key=lambda f: f[0])[1]


@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_search_matches_a_plain_reference(setup, use_cache):
    model, enc = setup
    prompt_len = enc["input_ids"].shape[1]
    greedy = model.generate(**enc, max_new_tokens=4)
    eos = int(greedy[0, prompt_len + 1])  # likely to end some hypotheses early
    out = model.generate(
        **enc, max_new_tokens=4, num_beams=3, eos_token_id=eos, use_cache=use_cache
    )
    for row in range(2):
        expected = reference_beam_search(model, enc, row, 3, 4, eos)
        got = out[row, prompt_len:].tolist()
        assert got[: len(expected)] == expected
        assert all(t == model.special_tokens.pad_id for t in got[len(expected) :])


def test_beam_search_with_one_beam_is_greedy(setup):
    model, enc = setup
    assert torch.equal(
        model.generate(**enc, max_new_tokens=4, num_beams=1),
        model.generate(**enc, max_new_tokens=4),
    )


def test_score_equals_log_likelihood_from_full_forwards(setup, processor):
    model, enc = setup
    ids = enc["input_ids"][1:]
    mask = enc["attention_mask"][1:]
    pixels = padded(enc)[1:, :1]
    candidates = [torch.tensor([5, 17, 99]), torch.tensor([42]), torch.tensor([7, 8])]
    calls = count_vision_calls(model)
    scores = model.score(ids, candidates, attention_mask=mask, pixel_values=pixels)
    assert calls == [1]
    for cand, got in zip(candidates, scores.tolist(), strict=True):
        full = torch.cat([ids, cand[None]], 1)
        full_mask = torch.cat([mask, torch.ones(1, len(cand), dtype=torch.long)], 1)
        with torch.no_grad():
            logprobs = model(full, full_mask, pixel_values=pixels).logits[0].log_softmax(-1)
        start = ids.shape[1] - 1
        expected = sum(float(logprobs[start + i, t]) for i, t in enumerate(cand.tolist()))
        assert got == pytest.approx(expected, abs=1e-4)


def lm_calls(model) -> list[tuple[int, int]]:
    """(rows, positions with logits) of every LM call."""
    calls = []
    model.lm.register_forward_hook(lambda m, args, out: calls.append(tuple(out[0].shape[:2])))
    return calls


@pytest.mark.parametrize("num_beams", [1, 3])
def test_the_prompt_runs_once_and_only_its_last_position_gets_logits(setup, num_beams):
    model, enc = setup
    calls = lm_calls(model)
    model.generate(**enc, max_new_tokens=4, num_beams=num_beams)
    assert calls[0] == (2, 1)  # the prefill: each prompt once, one position of logits
    assert all(call == (2 * num_beams, 1) for call in calls[1:])  # the decoding steps


def test_score_takes_its_candidates_a_chunk_at_a_time(setup):
    model, enc = setup
    ids, mask, pixels = enc["input_ids"][1:], enc["attention_mask"][1:], padded(enc)[1:]
    g = torch.Generator().manual_seed(0)
    candidates = [torch.randint(3, 800, (1 + i % 4,), generator=g) for i in range(23)]
    together = model.score(ids, candidates, attention_mask=mask, pixel_values=pixels)
    calls = lm_calls(model)
    chunked = model.score(
        ids, candidates, attention_mask=mask, pixel_values=pixels, candidates_per_call=7
    )
    assert [rows for rows, _ in calls] == [1, 7, 7, 7, 2]  # the prompt, then 23 = 7+7+7+2
    torch.testing.assert_close(chunked, together, rtol=0, atol=1e-5)  # batch-size rounding
    again = model.score(ids, candidates, attention_mask=mask, pixel_values=pixels)
    assert torch.equal(again, together)  # the prompt's cache was not consumed by the chunks


def test_bad_arguments(setup):
    model, enc = setup
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(**enc, max_new_tokens=0)
    with pytest.raises(ValueError, match="does not sample"):
        model.generate(**enc, num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match="one prompt"):
        model.score(enc["input_ids"], [torch.tensor([1])])
