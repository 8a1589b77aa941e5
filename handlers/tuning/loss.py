"""Next-token loss without full-vocabulary logits: the LM head and cross-entropy in chunks of tokens.

A plain `model(**batch).logits` holds `batch x seq x vocab` fp32 logits, and cross-entropy keeps a few
more tensors of that size for backward (log-softmax, its gradient, the logits' gradient): on SmolLM2-135M
(vocabulary 49,152) a batch of 8 x 512 tokens is ~0.8 GB per copy, more than the whole model. Here:

1. the decoder runs without its head (`get_decoder()`): hidden states `batch x seq x hidden`; packed
   rows pass their example layout down to the attention (`packed`: attention example by example);
2. only positions whose next token is labelled are kept (prompt tokens masked by the chat format cost no
   LM-head work at all);
3. `LinearCrossEntropy` walks those rows `chunk` at a time: logits of one chunk (fp32), their
   log-sum-exp and target logit for the exact loss sum, and, when gradients are wanted, the softmax
   gradient turned straight into the gradient of the chunk's hidden rows (and of the head weight if it
   trains). Backward only scales those saved gradients, so the head is never run twice and at most one
   chunk of logits is alive at a time (Liger's fused-linear-cross-entropy scheme, in plain torch so it
   runs on CPU and CUDA alike).

Heads that are not a plain bias-free `nn.Linear` (LoRA on `lm_head`, soft-capped logits) keep the same
chunking through `torch.utils.checkpoint` per chunk instead: recomputed in backward, still one chunk alive.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from handlers.tuning.packed import segments

IGNORE_INDEX = -100
CHUNK_BYTES = 1 << 27  # fp32 logits of one chunk: 128 MiB (682 tokens at vocabulary 49,152)


def chunk_rows(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take about `chunk_bytes`."""
    return max(16, chunk_bytes // (4 * vocab))


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), chunked; gradients computed in the same pass."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(weight.dtype, torch.float32)  # fp32 logits (fp64 stays fp64)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if want_w else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            logits = (h.to(weight.dtype) @ weight.t()).to(acc)  # the only chunk x vocab tensor
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if want_h or want_w:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0  # d(sum CE)/d(logits)
                g = probs.to(weight.dtype)
                if grad_h is not None:
                    grad_h[start : start + chunk] = (g @ weight).to(hidden.dtype)
                if grad_w is not None:
                    grad_w.addmm_(g.t().to(acc), h.to(acc))
                del probs, g
            del logits, lse
        ctx.save_for_backward(*(x for x in (grad_h, grad_w) if x is not None))
        ctx.have = (grad_h is not None, grad_w is not None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0) if ctx.have[0] else None
        grad_w = saved.pop(0) if ctx.have[1] else None
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None


def _plain_head(head: Any, config: Any) -> bool:
    return (type(head) is torch.nn.Linear and head.bias is None
            and getattr(config, "final_logit_softcapping", None) is None
            and getattr(config, "logit_scale", None) is None)


def _checkpointed_ce(head: Any, config: Any, hidden: torch.Tensor, targets: torch.Tensor,
                     chunk: int) -> torch.Tensor:
    def one(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()
        cap = getattr(config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        scale = getattr(config, "logit_scale", None)
        if scale is not None:
            logits = logits * scale
        return F.cross_entropy(logits, t, reduction="sum")

    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        total = total + (checkpoint(one, h, t, use_reentrant=False) if torch.is_grad_enabled() else one(h, t))
    return total


def causal_lm(model: Any) -> Any:
    """The transformers `*ForCausalLM` inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def token_loss_sum(model: Any, batch: dict[str, torch.Tensor], labels: torch.Tensor,
                   chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Sum of next-token cross-entropy over labelled positions (fp32), without full-batch logits.

    Equal to `F.cross_entropy(model(**batch).logits[:, :-1], labels[:, 1:], reduction="sum")` up to float
    summation order. `labels` uses `IGNORE_INDEX` for positions without a target.
    """
    lm = causal_lm(model)
    extra = {"segments": segments(batch["position_ids"])} if "position_ids" in batch else {}
    hidden = lm.get_decoder()(**batch, use_cache=False, **extra).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    rows = hidden[:, :-1][keep]  # (labelled tokens, hidden): no head work on masked prompt tokens
    targets = targets[keep]
    head = lm.get_output_embeddings()
    chunk = chunk_rows(head.weight.shape[0], chunk_bytes)
    if _plain_head(head, lm.config):
        return LinearCrossEntropy.apply(rows, head.weight, targets, chunk)
    return _checkpointed_ce(head, lm.config, rows, targets, chunk)
