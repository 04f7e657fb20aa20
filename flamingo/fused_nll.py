"""The LM head and the next-token NLL fused, a chunk of rows at a time (no full logits).

For a real vocabulary the float32 logits ``(B, T, V)`` are the largest activation of a training
step (OPT: V = 50272, Llama 3: 128256), and the plain path keeps several copies alive at once:
the logits, their log-softmax saved for backward, and the gradient. Here, for a chunk of rows,
the head matmul, the log-sum-exp, the loss and the gradient with respect to the hidden states
(and to the new-token rows) are computed together *during the forward*; the backward only
scales what was stored by the incoming gradient. The loss needs O(chunk * V) memory instead of
O(B * T * V), with no extra FLOPs: with a frozen base head the gradient matmul that the plain
backward would do is the one done here (a trained head, LLaVA's stage 2, adds its own).

By default only rows with a target are computed at all, so padding and masked text cost no head
FLOPs; gathering them needs their count on the host. With ``compact=False`` (sync-free
execution, for accelerators) every row goes through the head in fixed-shape chunks and rows
without a target are masked out: the same loss and gradients, no host-device synchronisation.

The logits this computes are exactly those of :meth:`flamingo.lm.FlamingoLM.logits`: the base
head's columns (in the head's dtype, then float32), zero columns up to ``vocab_size``, and the
new tokens' columns from their own float32 rows, overriding base columns they fall inside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 24
"""On the CPU, at most this many logits per chunk (64 MiB of float32; OPT's vocabulary: 333
rows), the rows split evenly. Fewer, larger chunks keep the head matmul efficient: on 2 CPU
cores, forward and backward for 510 rows x 50272 columns took 0.79 s in chunks of 166 rows,
0.66 s in chunks of 256 and 0.59 s in one (the unfused path: 0.92 s)."""
ACCELERATOR_CHUNK_ELEMENTS = 1 << 29
"""On an accelerator, at most this many logits per chunk (2 GiB of float32): at least 4096 rows
for vocabularies up to 131072 (Llama 3's 128256: 4186 rows; OPT's 50272: 10680), so that the
head's matrix products are large enough to fill a GPU and the chunk loop runs a few times per
micro-batch, not hundreds."""


def chunk_rows_for(num_rows: int, vocab_size: int, device_type: str) -> int:
    """Rows per chunk: as many as the device's logit budget allows, the rows split evenly."""
    budget = CHUNK_ELEMENTS if device_type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    num_chunks = -(-num_rows * vocab_size // budget)  # ceil
    return max(1, -(-num_rows // max(1, num_chunks)))


def fused_summed_nll(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    base_weight: torch.Tensor,
    new_weight: torch.Tensor,
    new_ids: torch.Tensor,
    vocab_size: int,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
    compact: bool = True,
) -> torch.Tensor:
    """Sum of the next-token NLL over the targets, straight from the final hidden states.

    ``hidden (B, T, D)``: the LM's last hidden states; ``labels (B, T)``: token ids, with
    ``ignore_index`` where no loss is taken (position t predicts ``labels[:, t + 1]``);
    ``base_weight (Vb, D)``: the frozen output matrix; ``new_weight (k, D)``: the new tokens'
    output rows, placed at columns ``new_ids (k,)``; ``vocab_size``: the columns of the
    assembled logits; ``compact``: gather the rows with a target first (the host reads their
    count) or mask the others (module docstring). Returns a float32 scalar, differentiable with
    respect to ``hidden``, ``new_weight`` and, when it trains (an LM fine-tuned whole, LLaVA's
    stage 2), ``base_weight``: its gradient costs one more matrix product per chunk.
    """
    targets = labels[:, 1:]
    valid = targets != ignore_index
    if compact:
        rows, targets, weights = hidden[:, :-1][valid], targets[valid], None  # (N, D)
    else:
        rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B (T-1), D)
        weights = valid.reshape(-1)
        targets = targets.reshape(-1).masked_fill(~weights, 0)  # any valid id: masked below
    if chunk_rows is None:
        chunk_rows = chunk_rows_for(rows.shape[0], vocab_size, rows.device.type)
    need_grad = torch.is_grad_enabled() and (
        rows.requires_grad or new_weight.requires_grad or base_weight.requires_grad
    )
    return _FusedHeadNLL.apply(
        rows, new_weight, targets, weights, base_weight, new_ids, vocab_size, chunk_rows, need_grad
    )


class _FusedHeadNLL(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        rows: torch.Tensor,
        new_weight: torch.Tensor,
        targets: torch.Tensor,
        weights: torch.Tensor | None,
        base_weight: torch.Tensor,
        new_ids: torch.Tensor,
        vocab_size: int,
        chunk_rows: int,
        need_grad: bool,
    ) -> torch.Tensor:
        # Every step is a fixed-shape tensor op: no value goes back to the host.
        base_vocab = base_weight.shape[0]
        inside = new_ids < base_vocab  # new columns that override base columns
        overridden = torch.zeros(base_vocab, dtype=torch.long, device=rows.device)
        overridden = overridden.index_add_(0, new_ids.clamp(max=base_vocab - 1), inside.long()) > 0
        # zero columns of the assembled logits: beyond the base, not taken by a new token
        num_zero_columns = vocab_size - base_vocab - (~inside).sum()
        has_zero_columns = num_zero_columns > 0
        new_position = torch.full((vocab_size,), -1, dtype=torch.long, device=rows.device)
        new_position[new_ids] = torch.arange(len(new_ids), device=rows.device)

        has_new = new_weight.shape[0] > 0
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        grad_rows = torch.empty_like(rows) if need_grad else None
        grad_new = torch.zeros_like(new_weight, dtype=torch.float32) if need_grad else None
        trains_base = need_grad and base_weight.requires_grad
        grad_base = torch.zeros_like(base_weight, dtype=torch.float32) if trains_base else None
        for start in range(0, rows.shape[0], chunk_rows):
            h = rows[start : start + chunk_rows]
            t = targets[start : start + chunk_rows]
            base = F.linear(h.to(base_weight.dtype), base_weight).float()  # (n, Vb)
            new = F.linear(h.to(new_weight.dtype), new_weight).float()  # (n, k)
            base.masked_fill_(overridden, float("-inf"))  # overridden by the new columns
            t_new = new_position[t]  # index among the new rows, -1 for other tokens
            is_new = t_new >= 0
            on_base = ~is_new & (t < base_vocab)
            t_base = torch.where(on_base, t, 0)
            on_base_logit = torch.where(on_base, base.gather(1, t_base[:, None]).squeeze(1), 0.0)
            if has_new:
                new_logit = new.gather(1, t_new.clamp(min=0)[:, None]).squeeze(1)
                target_logit = torch.where(is_new, new_logit, on_base_logit)
                peak = torch.maximum(base.amax(-1), new.amax(-1))[:, None]
            else:  # no new token (a checkpoint's tokenizer brings them all: LLaVA, Llama 3.2)
                target_logit, peak = on_base_logit, base.amax(-1)[:, None]
            peak = torch.where(has_zero_columns, peak.clamp(min=0.0), peak)
            base, new = base.sub_(peak).exp_(), new.sub_(peak).exp_()  # overridden: exactly 0
            sum_exp = base.sum(-1, keepdim=True) + new.sum(-1, keepdim=True)
            sum_exp += torch.where(has_zero_columns, num_zero_columns * (-peak).exp(), 0.0)
            nll = (peak + sum_exp.log()).squeeze(1) - target_logit
            if weights is not None:
                w = weights[start : start + chunk_rows]
                nll = torch.where(w, nll, 0.0)
            total += nll.sum()
            if not need_grad:
                continue
            # d(sum NLL)/d logits = softmax - one_hot(target), for each part of the vocabulary
            base, new = base.div_(sum_exp), new.div_(sum_exp)
            base.scatter_add_(1, t_base[:, None], -on_base.to(base.dtype)[:, None])
            if has_new:
                new.scatter_add_(1, t_new.clamp(min=0)[:, None], -is_new.to(new.dtype)[:, None])
            if weights is not None:  # rows without a target: no gradient
                base.mul_(w[:, None])
                new.mul_(w[:, None])
            grad_h = (base.to(base_weight.dtype) @ base_weight).to(rows.dtype)
            grad_h += (new.to(new_weight.dtype) @ new_weight).to(rows.dtype)
            grad_rows[start : start + chunk_rows] = grad_h
            grad_new += new.t() @ h.to(new_weight.dtype).float()
            if trains_base:
                grad_base += base.t() @ h.float()
        if need_grad:  # otherwise the output has no graph and backward never runs
            ctx.trains_base = trains_base
            saved = [grad_rows, grad_new.to(new_weight.dtype)]
            ctx.save_for_backward(
                *saved, *([grad_base.to(base_weight.dtype)] if trains_base else [])
            )
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        grad_rows, grad_new, *grad_base = ctx.saved_tensors
        base = grad_base[0] * grad_out.to(grad_base[0].dtype) if ctx.trains_base else None
        return (
            grad_rows * grad_out.to(grad_rows.dtype),
            grad_new * grad_out,
            None,
            None,
            base,
            *(None,) * 4,
        )
