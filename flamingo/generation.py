"""Decoding and scoring with media encoded once and every cache reused.

Per call, the vision tower and the resampler run once; every gated block computes its
cross-attention keys/values once (:class:`~flamingo.xattn.MediaKV`); beams share them by
indexing rather than re-encoding (OpenFlamingo re-encodes the media per beam and recomputes the
keys/values at every token). The LM decodes with its own KV cache. With the LLaVA connector the
projected media enter once, with the prompt, and the LM's cache carries them from there.

``generate`` returns full sequences (prompt + new tokens) like Hugging Face; finished rows are
padded with the pad token. ``<image>``, ``<PAD>`` and ids beyond the tokenizer are never
generated: no image could follow a generated ``<image>``.

``score`` gives the log-likelihood of candidate continuations of one prompt, running the
prompt once and reusing its caches for every candidate (classification, HatefulMemes).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from flamingo.tokens import SpecialTokens


class Flamingo(Protocol):
    """What decoding needs of the model (``flamingo.model.Flamingo``, which calls into this
    module: it is not imported here)."""

    lm: nn.Module
    training: bool
    special_tokens: SpecialTokens
    fusion: Any

    def __call__(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any: ...
    def encode_media(
        self, pixel_values: torch.Tensor, media_slots: Any = None, aspect_ratio_ids: Any = None
    ) -> Any: ...
    def media_mask(self, aspect_ratio_ids: torch.Tensor, media_slots: Any = None) -> Any: ...
    def media_index(self, input_ids: torch.Tensor) -> torch.Tensor: ...
    def train(self, mode: bool = True) -> Any: ...
    def eval(self) -> Any: ...


@dataclass
class _Prompt:
    """A prompt's tensors, with its media encoded once (``media``: what the model's fusion
    keeps for decoding, ``Fusion.decoding``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    media: Any
    media_index: torch.Tensor

    def select(self, model: Flamingo, index: torch.Tensor) -> _Prompt:
        """Rows ``index`` of the batch (each prompt once per beam or candidate)."""
        return _Prompt(
            self.input_ids[index],
            self.attention_mask[index],
            model.fusion.select(self.media, index),
            self.media_index[index],
        )


def _prepare(
    model: Flamingo,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pixel_values: torch.Tensor | None,
    media_slots: torch.Tensor | None,
    media_latents: torch.Tensor | None,
    use_cache: bool,
    aspect_ratio_ids: torch.Tensor | None = None,
) -> _Prompt:
    if pixel_values is not None and media_latents is not None:
        raise ValueError("give pixel_values or media_latents, not both")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    media_mask = None
    if pixel_values is not None:
        media_latents = model.encode_media(pixel_values, media_slots, aspect_ratio_ids)
        if aspect_ratio_ids is not None:
            media_mask = model.media_mask(aspect_ratio_ids, media_slots)
    elif media_slots is not None:
        raise ValueError("media_slots were given without pixel_values")
    # once per call
    media = model.fusion.decoding(model, media_latents, use_cache, input_ids, media_mask)
    return _Prompt(input_ids, attention_mask, media, model.media_index(input_ids))


class _Decoder:
    """Runs the model one step at a time, with or without caches (same results)."""

    def __init__(self, model: Flamingo, prompt: _Prompt, use_cache: bool) -> None:
        self.model = model
        self.use_cache = use_cache
        self.ids = prompt.input_ids
        self.mask = prompt.attention_mask
        self.media = prompt.media
        self.media_index = prompt.media_index
        self.cache: Any = None

    def first_logits(self) -> torch.Tensor:
        """Next-token logits after the prompt: (B, V)."""
        return self._run(self.ids, self.media_index, first=True)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` (B,) and return the next-token logits (B, V)."""
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(tokens[:, None])], dim=1)
        # <image> is never generated, so new tokens keep the last media of their row.
        self.media_index = torch.cat([self.media_index, self.media_index[:, -1:]], dim=1)
        if self.use_cache:
            return self._run(tokens[:, None], self.media_index[:, -1:])
        return self._run(self.ids, self.media_index)

    def expand(self, k: int) -> None:
        """Each row becomes ``k`` copies (beam search: the prompt runs once, then its state,
        caches included, is repeated for the beams)."""
        self.ids, self.mask, self.media_index = (
            t.repeat_interleave(k, dim=0) for t in (self.ids, self.mask, self.media_index)
        )
        rows = torch.arange(self.ids.shape[0] // k, device=self.ids.device)
        self.media = self.model.fusion.select(self.media, rows.repeat_interleave(k))
        if self.cache is not None:
            self.cache.batch_repeat_interleave(k)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (beam search). Media are shared within a prompt's beams."""
        self.ids, self.mask, self.media_index = (
            self.ids[index],
            self.mask[index],
            self.media_index[index],
        )
        if self.cache is not None:
            self.cache.reorder_cache(index)

    def _run(
        self, ids: torch.Tensor, media_index: torch.Tensor, first: bool = False
    ) -> torch.Tensor:
        out = self.model(
            ids,
            self.mask,
            **self.model.fusion.step_media(self.media, self.use_cache, first),
            media_index=media_index,
            cache=self.cache,
            use_cache=self.use_cache,
            logits_to_keep=1,  # the next token's: no (B, T, V) logits for the prompt
        )
        self.cache = out.cache
        return out.logits[:, -1]


def _banned_tokens(model: Flamingo, logits: torch.Tensor) -> torch.Tensor:
    """Mask (V,) of ids never generated: <image> (and IDEFICS's <fake_token_around_image>),
    <PAD>, rows beyond the tokenizer."""
    special = model.special_tokens
    banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    banned[model.lm.tokenizer_size :] = True
    never = [special.image_id, special.around_image_id]
    if special.pad_id in special.new_ids:
        never.append(special.pad_id)
    for token in never:
        if token is not None and token < banned.shape[0]:  # one no logit covers is never drawn
            banned[token] = True
    return banned


def _sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Flamingo,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    media_latents: torch.Tensor | None = None,
    media_slots: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    num_beams: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    length_penalty: float = 1.0,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    aspect_ratio_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Continue each (left-padded) prompt; returns (B, T + generated) token ids.

    Greedy by default; ``do_sample`` samples with ``temperature``/``top_k``/``top_p``;
    ``num_beams > 1`` runs beam search (scores are summed log-probabilities divided by
    ``generated_length ** length_penalty``; a prompt is done once it has ``num_beams`` finished
    hypotheses and no running beam can still beat the worst of them at its current length).
    ``eos_token_id`` defaults to ``<|endofchunk|>``. ``use_cache=False`` recomputes the whole
    sequence at every step (for tests and comparisons). ``aspect_ratio_ids`` go with the
    pixels of a tiled tower (the processor gives them).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_beams < 1 or (num_beams > 1 and do_sample):
        raise ValueError("num_beams must be >= 1, and beam search does not sample")
    if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
        raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    was_training = model.training
    model.eval()
    try:
        eos = model.special_tokens.end_of_chunk_id if eos_token_id is None else eos_token_id
        prompt = _prepare(
            model,
            input_ids,
            attention_mask,
            pixel_values,
            media_slots,
            media_latents,
            use_cache,
            aspect_ratio_ids,
        )
        if num_beams == 1:
            return _greedy_or_sample(
                model,
                prompt,
                max_new_tokens,
                do_sample,
                temperature,
                top_k,
                top_p,
                eos,
                use_cache,
                generator,
            )
        return _beam_search(
            model, prompt, max_new_tokens, num_beams, eos, length_penalty, use_cache
        )
    finally:
        model.train(was_training)


def _greedy_or_sample(
    model, prompt, max_new_tokens, do_sample, temperature, top_k, top_p, eos, use_cache, generator
) -> torch.Tensor:
    decoder = _Decoder(model, prompt, use_cache)
    logits = decoder.first_logits()
    banned = _banned_tokens(model, logits)
    pad = model.special_tokens.pad_id
    finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    for step in range(max_new_tokens):
        logits = logits.masked_fill(banned, float("-inf"))
        if do_sample:
            tokens = _sample(logits, temperature, top_k, top_p, generator)
        else:
            tokens = logits.argmax(-1)
        tokens = tokens.masked_fill(finished, pad)
        finished |= tokens == eos
        if finished.all() or step == max_new_tokens - 1:
            return torch.cat([decoder.ids, tokens[:, None]], dim=1)
        logits = decoder.step(tokens)
    raise AssertionError("unreachable")


@dataclass
class _Hypotheses:
    """Finished beam hypotheses of one prompt, best first."""

    num_beams: int
    length_penalty: float
    items: list[tuple[float, torch.Tensor]] = field(default_factory=list)

    def add(self, tokens: torch.Tensor, sum_logprobs: float) -> None:
        score = sum_logprobs / (len(tokens) ** self.length_penalty)
        self.items.append((score, tokens))
        self.items.sort(key=lambda item: -item[0])
        del self.items[self.num_beams :]

    def done(self, best_running_sum: float, generated: int) -> bool:
        if len(self.items) < self.num_beams:
            return False
        return best_running_sum / (generated**self.length_penalty) <= self.items[-1][0]


def _beam_search(
    model, prompt, max_new_tokens, num_beams, eos, length_penalty, use_cache
) -> torch.Tensor:
    batch, prompt_len = prompt.input_ids.shape
    device = prompt.input_ids.device
    k = num_beams
    pad = model.special_tokens.pad_id
    decoder = _Decoder(model, prompt, use_cache)
    logits = decoder.first_logits()  # the prompts run once, then are repeated for the beams
    decoder.expand(k)
    logits = logits.repeat_interleave(k, dim=0)
    banned = _banned_tokens(model, logits)
    vocab = logits.shape[-1]
    # Only the first beam of each prompt is live at the start: the others are copies.
    beam_scores = torch.full((batch, k), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0
    hyps = [_Hypotheses(k, length_penalty) for _ in range(batch)]
    done = [False] * batch
    for step in range(max_new_tokens):
        generated = step + 1
        logprobs = logits.masked_fill(banned, float("-inf")).log_softmax(-1).view(batch, k, vocab)
        scores = (beam_scores[..., None] + logprobs).view(batch, k * vocab)
        top_scores, top_index = scores.topk(2 * k, dim=-1)
        # the choices are made on the host, from one copy of the 2k best per prompt
        top_scores, top_index = top_scores.tolist(), top_index.tolist()
        next_scores = [[float("-inf")] * k for _ in range(batch)]
        next_beams = [[0] * k for _ in range(batch)]
        next_tokens = [[pad] * k for _ in range(batch)]
        for b in range(batch):
            if done[b]:
                continue
            kept = 0
            for rank in range(2 * k):
                score, (beam, token) = top_scores[b][rank], divmod(top_index[b][rank], vocab)
                if score == float("-inf"):
                    break
                if token == eos:
                    if rank < k:
                        seq = decoder.ids[b * k + beam, prompt_len:]
                        hyps[b].add(torch.cat([seq, seq.new_tensor([eos])]), score)
                    continue
                next_scores[b][kept], next_beams[b][kept], next_tokens[b][kept] = score, beam, token
                kept += 1
                if kept == k:
                    break
            done[b] = hyps[b].done(max(next_scores[b]), generated)
        if step == max_new_tokens - 1 or all(done):
            break
        beam_scores = torch.tensor(next_scores, device=device)
        beams = torch.tensor(next_beams, device=device)
        rows = (torch.arange(batch, device=device)[:, None] * k + beams).view(-1)
        decoder.reorder(rows)
        logits = decoder.step(torch.tensor(next_tokens, device=device).view(-1))
    # prompts still running at the end: their live beams are candidates too
    for b in range(batch):
        if not done[b]:
            for j in range(k):
                if next_scores[b][j] > float("-inf"):
                    seq = decoder.ids[b * k + next_beams[b][j], prompt_len:]
                    hyps[b].add(
                        torch.cat([seq, seq.new_tensor([next_tokens[b][j]])]), next_scores[b][j]
                    )
    best = [hyps[b].items[0][1] for b in range(batch)]
    width = max(len(t) for t in best)
    out = torch.full((batch, prompt_len + width), pad, dtype=torch.long, device=device)
    out[:, :prompt_len] = prompt.input_ids
    for b, tokens in enumerate(best):
        out[b, prompt_len : prompt_len + len(tokens)] = tokens
    return out


@torch.no_grad()
def score(
    model: Flamingo,
    input_ids: torch.Tensor,
    candidates: list[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    media_latents: torch.Tensor | None = None,
    media_slots: torch.Tensor | None = None,
    candidates_per_call: int = 64,
    aspect_ratio_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-likelihood of each candidate continuation of one prompt.

    ``input_ids (1, T)`` is the prompt (with its media); ``candidates`` lists 1-D token-id
    tensors. The prompt runs once; its LM cache and media keys/values are shared by every
    candidate, ``candidates_per_call`` at a time (each call holds that many copies of the
    prompt's cache and their logits: ImageNet's 1000 classes in 16 calls). Returns
    (num_candidates,) summed log-probabilities (divide by the lengths for a per-token average).
    """
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"score takes one prompt (input_ids of shape (1, T)), got {tuple(input_ids.shape)}"
        )
    if not candidates or any(c.ndim != 1 or c.numel() == 0 for c in candidates):
        raise ValueError("candidates must be a non-empty list of non-empty 1-D token-id tensors")
    if candidates_per_call < 1:
        raise ValueError(f"candidates_per_call must be >= 1, got {candidates_per_call}")
    was_training = model.training
    model.eval()
    try:
        prompt = _prepare(
            model,
            input_ids,
            attention_mask,
            pixel_values,
            media_slots,
            media_latents,
            True,
            aspect_ratio_ids,
        )
        first = model(
            prompt.input_ids,
            prompt.attention_mask,
            **model.fusion.step_media(prompt.media, True, True),
            media_index=prompt.media_index,
            use_cache=True,
            logits_to_keep=1,
        )
        first_logprobs = first.logits[0, -1].log_softmax(-1)
        chunks = [
            candidates[i : i + candidates_per_call]
            for i in range(0, len(candidates), candidates_per_call)
        ]
        last = len(chunks) - 1
        return torch.cat(
            [
                # the last chunk may extend the prompt's own cache; the others extend copies
                _score_chunk(model, prompt, first, first_logprobs, chunk, i == last)
                for i, chunk in enumerate(chunks)
            ]
        )
    finally:
        model.train(was_training)


def _score_chunk(model, prompt, first, first_logprobs, candidates, last: bool) -> torch.Tensor:
    """Summed log-probabilities of ``candidates`` after the prompt whose first forward (with
    its cache) is ``first``; the ``last`` chunk may extend that cache itself."""
    device = prompt.input_ids.device
    n = len(candidates)
    lengths = torch.tensor([len(c) for c in candidates], device=device)
    width = max(len(c) for c in candidates)
    cand = torch.full((n, width), model.special_tokens.pad_id, dtype=torch.long, device=device)
    for i, c in enumerate(candidates):
        cand[i, : len(c)] = c
    valid = torch.arange(width, device=device)[None] < lengths[:, None]
    total = first_logprobs[cand[:, 0]]
    if width == 1:
        return total
    shared = prompt.select(model, torch.zeros(n, dtype=torch.long, device=device))
    cache = first.cache if last else copy.deepcopy(first.cache)
    cache.batch_repeat_interleave(n)
    mask = torch.cat([shared.attention_mask, valid[:, :-1].long()], dim=1)
    media_index = shared.media_index[:, -1:].expand(n, width - 1)
    out = model(
        cand[:, :-1],
        mask,
        **model.fusion.step_media(shared.media, True, False),
        media_index=media_index,
        cache=cache,
        use_cache=True,
    )
    logprobs = out.logits.log_softmax(-1).gather(-1, cand[:, 1:, None]).squeeze(-1)
    return total + (logprobs * valid[:, 1:]).sum(-1)
