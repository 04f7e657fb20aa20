"""Our models in lmms-eval, the harness the field compares multimodal models with.

Installed with the ``lmms-eval`` extra, the plugin registers itself through lmms-eval's entry
point group ``lmms_eval.models`` (pyproject.toml), so no fork of lmms-eval is needed:

    python -m lmms_eval --model flamingo --model_args pretrained=PATH_OR_HUB_ID \\
        --tasks ok_vqa_val2014 --batch_size 8

``pretrained`` is anything :meth:`Flamingo.from_pretrained` loads: our checkpoints,
OpenFlamingo, IDEFICS, LLaVA, BLIP-2 and Llama 3.2 Vision. Other ``model_args``: ``device``,
``dtype`` (``float32``, ``bfloat16``, ``float16``), ``chat`` (write the prompt as a user turn
in the checkpoint's chat template, for instruction-tuned checkpoints; default: the plain
interleaved form, each image's ``<image>`` before the task's text, as Flamingo-style base
models read it), ``num_beams`` and ``max_new_tokens`` (defaults when a task does not set
them).

Requests: ``generate_until`` (batched; greedy, beams or sampling as the task's
``generation_kwargs`` say; the answer cut at the first ``until`` string and at the LM's end
of text) and ``loglikelihood`` (the requests of one document and context scored together by
:meth:`Flamingo.score`, which runs the prompt once and shares its caches across the
candidates; whether greedy decoding gives the continuation, and its summed *negative*
log-likelihood: lmms-eval 0.7.3 picks a multiple-choice answer by the smallest value, as its
own models return losses; its ``perplexity`` metric, ``exp(-mean)``, then reads ``exp(-NLL)``,
as it does for its own models). Multi-round generation and video inputs are refused by name.

lmms-eval's demonstrations are text-only, so this is a third protocol beside ``eval/``'s
``official`` and ``openflamingo`` few-shot protocols, not a replacement for them.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image
from tqdm import tqdm

from flamingo import Flamingo, FlamingoProcessor
from flamingo.tokens import IMAGE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_ID = "flamingo"


def manifest() -> ModelManifest:
    """The entry point's payload: ``--model flamingo`` is :class:`FlamingoLMMs`."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.FlamingoLMMs")


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text not in ("true", "false", "1", "0"):
        raise ValueError(f"expected true or false, got {value!r}")
    return text in ("true", "1")


class FlamingoLMMs(lmms):
    """``--model flamingo``: a checkpoint :meth:`Flamingo.from_pretrained` loads, behind
    lmms-eval's simple (context string + images) model interface."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int | str = 1,
        chat: bool | str = False,
        num_beams: int = 1,
        max_new_tokens: int = 32,
        revision: str | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"--model flamingo: unknown model_args {sorted(unknown)}; it takes pretrained, "
                "device, dtype, batch_size, chat, num_beams, max_new_tokens, revision"
            )
        if dtype not in DTYPES:
            raise ValueError(f"--model flamingo: dtype={dtype!r}, expected one of {list(DTYPES)}")
        if str(batch_size).startswith("auto"):
            raise ValueError("--model flamingo: batch_size=auto is not supported; give a number")
        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))
        if device is None:
            local = int(os.environ.get("LOCAL_RANK", 0))
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.model = Flamingo.from_pretrained(
            pretrained, dtype=self.dtype, device=self._device, revision=revision
        ).eval()
        self.processor = FlamingoProcessor.from_pretrained(pretrained, revision=revision)
        self.batch_size_per_gpu = int(batch_size)
        self.chat = _flag(chat)
        self.num_beams, self.max_new_tokens = int(num_beams), int(max_new_tokens)
        self.task_dict: dict[str, Any] = {}

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # -- prompts ----------------------------------------------------------------------------------

    def _images(self, doc_to_visual: Callable, doc_id: int, task: str, split: str) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        images = []
        for visual in visuals:
            if isinstance(visual, Image.Image):
                images.append(visual.convert("RGB"))
            elif isinstance(visual, str) and os.path.splitext(visual)[1].lower() in (
                ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif",
            ):  # fmt: skip
                images.append(Image.open(visual).convert("RGB"))
            else:
                raise ValueError(
                    f"task {task}: document {doc_id} gives a {type(visual).__name__} visual "
                    f"({str(visual)[:80]!r}); --model flamingo takes images (PIL images or "
                    "image file paths), not video or audio"
                )
        return images

    def _encode(self, contexts: list[str], images: list[list[Image.Image]]) -> dict:
        """One batch of prompts, each image's marker before its context (or in a chat turn)."""
        if self.chat:
            if any(len(i) > 1 for i in images):
                raise ValueError(
                    "chat=true writes one image per conversation (the checkpoints' chat "
                    "form); this task gives several: use chat=false"
                )
            conversations = [[{"role": "user", "text": c}] for c in contexts]
            own = getattr(self.processor.tokenizer, "chat_template", None)
            template = "checkpoint" if own else "vicuna_v1"
            enc = self.processor.chat(
                conversations,
                [i[0] if i else None for i in images],
                template=template,
                padding_side="left",
            )
        else:
            prompts = [IMAGE * len(i) + c for c, i in zip(contexts, images, strict=True)]
            enc = self.processor(prompts, images=images, padding_side="left")
        enc = {k: v.to(self._device) for k, v in enc.items()}
        if "pixel_values" in enc:
            enc["pixel_values"] = enc["pixel_values"].to(self.dtype)
        return enc

    # -- requests ---------------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Batches of requests with the same generation settings, longest context first."""
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="flamingo: generate")
        for key, members in groups.items():
            settings = json.loads(key)
            members.sort(key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(members), self.batch_size_per_gpu):
                batch = members[start : start + self.batch_size_per_gpu]
                for i, text in zip(batch, self._generate(requests, batch, settings), strict=True):
                    answers[i] = text
                bar.update(len(batch))
        bar.close()
        return [a if a is not None else "" for a in answers]

    @torch.no_grad()
    def _generate(self, requests: list[Instance], batch: list[int], settings: dict) -> list[str]:
        contexts = [requests[i].args[0] for i in batch]
        images = [self._images(*requests[i].args[2:6]) for i in batch]
        enc = self._encode(contexts, images)
        until = settings.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(settings.get("temperature") or 0.0)
        sample = bool(settings.get("do_sample")) and temperature > 0
        kwargs: dict[str, Any] = {
            "max_new_tokens": int(settings.get("max_new_tokens") or self.max_new_tokens),
            "num_beams": int(settings.get("num_beams") or self.num_beams),
        }
        if sample:
            kwargs |= {"do_sample": True, "temperature": temperature}
            kwargs["top_p"] = float(settings.get("top_p") or 1.0)
        if self.chat:
            kwargs["eos_token_id"] = self.processor.tokenizer.eos_token_id
        out = self.model.generate(**enc, **kwargs)
        texts = self.processor.batch_decode(out[:, enc["input_ids"].shape[1] :])
        return [cut(text, until, self.processor.tokenizer) for text in texts]

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """The requests of one document and context scored in one :meth:`Flamingo.score` call."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            context, _, _, doc_id, task, split = request.args
            groups[(task, split, doc_id, context)].append(i)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="flamingo: loglikelihood")
        for members in groups.values():
            for i, result in zip(members, self._score(requests, members), strict=True):
                results[i] = result
            bar.update(len(members))
        bar.close()
        # lmms-eval 0.7.3 turns every answer that is not text into a string (str((ll, greedy)))
        # before its multiple-choice scoring reads it; its GenerationResult wrapper passes the
        # pair through unchanged
        return [GenerationResult(text=r) for r in results if r is not None]  # type: ignore[arg-type]

    @torch.no_grad()
    def _score(self, requests: list[Instance], members: list[int]) -> list[tuple[float, bool]]:
        context, _, doc_to_visual, doc_id, task, split = requests[members[0]].args
        doc = self.task_dict[task][split][doc_id] if task in self.task_dict else None
        continuations = []
        for i in members:
            target = requests[i].args[1]
            continuations.append(target(doc) if callable(target) else target)
        images = self._images(doc_to_visual, doc_id, task, split)
        enc = self._encode([context], [images])
        tok = self.processor.tokenizer
        candidates = [
            torch.tensor(tok(c, add_special_tokens=False)["input_ids"], device=self._device)
            for c in continuations
        ]
        empty = [c for c, ids in zip(continuations, candidates, strict=True) if not ids.numel()]
        if empty:
            raise ValueError(f"task {task}: document {doc_id} has an empty continuation {empty}")
        media = {k: enc[k] for k in ("pixel_values", "media_slots", "aspect_ratio_ids") if k in enc}
        scores = self.model.score(
            enc["input_ids"], candidates, attention_mask=enc["attention_mask"], **media
        )
        # greedy: the longest candidate's length of greedy tokens, each candidate a prefix?
        longest = max(len(c) for c in candidates)
        greedy = self.model.generate(**enc, max_new_tokens=longest, eos_token_id=-1)
        greedy = greedy[0, enc["input_ids"].shape[1] :]
        # lmms-eval 0.7.3 ranks choices by the argmin of these (its own models return losses;
        # EvolvingLMMs-Lab/lmms-eval#370): the summed negative log-likelihood, so that its acc
        # picks what eval/'s class_ranking "sum" picks
        return [
            (-float(s), bool(torch.equal(greedy[: len(c)], c)))
            for s, c in zip(scores.tolist(), candidates, strict=True)
        ]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "--model flamingo does not run multi-round tasks (generate_until_multi_round): "
            "its prompts carry one round of text and images"
        )


def cut(text: str, until: list[str], tokenizer: Any) -> str:
    """A generated text up to the LM's end of text and the first ``until`` string."""
    for stop in (tokenizer.eos_token, *until):
        if stop:
            text = text.split(stop)[0]
    return text
