"""Strided sliding-window perplexity of one token stream (the transformers recipe)."""

from __future__ import annotations

from typing import Any

import torch

from .encode import target_nll


def _windows(n: int, span: int, stride: int, has_bos: bool) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) text positions of each window, HF recipe.

    A window scores text positions [first_scored, end); with no BOS the
    window's first token has no context, so it is never scored there.
    """
    out = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + span, n)
        first = max(prev_end, begin if has_bos else begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return out


@torch.inference_mode()
def sliding_window_nll(
    model: Any,
    token_ids: torch.Tensor,
    window: int,
    stride: int,
    bos_id: int | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> tuple[float, int]:
    """Strided sliding-window NLL of one token stream; returns (nll_sum, n_scored).

    The transformers perplexity recipe: windows start every ``stride`` tokens;
    the first window scores all its predictable tokens, each later one only
    the tokens not scored before (its last ``stride``), so every token is
    scored once, with the most context the window allows. With ``bos_id`` a BOS
    is prepended to every window, which then holds window-1 text tokens, and
    the stream's first token is scored too (n_scored == len) instead of
    n_scored == len - 1. With stride == window (no BOS) this is chunked
    evaluation over non-overlapping chunks.
    """
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
    span = window - (1 if bos_id is not None else 0)
    if span < (1 if bos_id is not None else 2):
        raise ValueError(f"window too small: {window}")
    if not 1 <= stride <= span:
        raise ValueError(f"stride must be in [1, {span}] (text tokens per window), got {stride}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    ids = token_ids.to(torch.long).cpu()
    windows = _windows(ids.numel(), span, stride, bos_id is not None)
    offset = 1 if bos_id is not None else 0

    was_training = model.training
    model.eval()  # dropout would make the NLL random
    nll_sum = 0.0
    n_scored = 0
    try:
        for i in range(0, len(windows), batch_size):
            group = windows[i : i + batch_size]
            width = max(end - begin for begin, end, _ in group) + offset
            # Right padding is invisible to a causal model's earlier positions,
            # so no attention mask is needed; padded positions are never scored.
            batch = torch.zeros((len(group), width), dtype=torch.long)
            rows, cols, targets = [], [], []
            for j, (begin, end, first) in enumerate(group):
                if bos_id is not None:
                    batch[j, 0] = bos_id
                batch[j, offset : offset + end - begin] = ids[begin:end]
                # Text position t sits at column t - begin + offset and is
                # predicted by the logits of the column before it.
                pos = torch.arange(first, end)
                rows.append(torch.full_like(pos, j))
                cols.append(pos - begin + offset - 1)
                targets.append(ids[first:end])
            logits = model(batch.to(device)).logits
            r, c, t = torch.cat(rows), torch.cat(cols), torch.cat(targets)
            picked = logits[r.to(logits.device), c.to(logits.device)]
            # float32 per token (target_nll), summed in float64 so long streams lose nothing.
            nll = target_nll(picked, t.to(logits.device))
            nll_sum += float(nll.double().sum().item())
            n_scored += int(t.numel())
    finally:
        model.train(was_training)
    return nll_sum, n_scored
