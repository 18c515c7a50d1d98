"""One forward pass per batch: capture the SAE's hook, encode with the frozen SAE,
write the nonzero codes as a sparse shard, and the per-token NLL beside it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .models import ActivationCapture
from .shards import CodeShardWriter, ShardMetadata, read_token_shard, write_nll_shard


@dataclass(frozen=True)
class EncodeConfig:
    batch_size: int = 16
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"encode.batch_size must be >= 1, got {self.batch_size}")


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, T-1] NLL of tokens 1..T-1 given their prefixes, computed in float32."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


@torch.no_grad()
def encode_token_shard(
    model: torch.nn.Module,
    sae: Any,
    hook_name: str,
    token_shard: str | Path,
    codes_path: str | Path,
    nll_path: str | Path,
    meta: dict[str, Any],
    cfg: EncodeConfig,
    device: torch.device,
) -> dict[str, Any]:
    """Encode one token shard; returns counts and timings for the job log."""
    seq_idx, ids, _ = read_token_shard(token_shard)
    n_seq, seq_len = ids.shape
    token_start = int(seq_idx[0]) * seq_len
    shard_meta = ShardMetadata(
        token_start=token_start,
        token_stop=token_start + n_seq * seq_len,
        d_sae=int(sae.cfg.d_sae),
        hook=hook_name,
        **meta,
    )
    sae_dtype = next(sae.parameters()).dtype
    nll_tokens: list[np.ndarray] = []
    nll_values: list[np.ndarray] = []
    started = time.perf_counter()
    with CodeShardWriter(codes_path, shard_meta) as writer:
        for lo in tqdm(
            range(0, n_seq, cfg.batch_size), desc=f"encode {meta['variant']}", unit="batch"
        ):
            batch = torch.from_numpy(ids[lo : lo + cfg.batch_size]).to(device)
            with ActivationCapture(model, [hook_name]) as capture:
                logits = model(input_ids=batch).logits
            acts = capture.activations[hook_name]
            codes = sae.encode(acts.to(sae_dtype).reshape(-1, acts.shape[-1]))
            rows, features = torch.nonzero(codes != 0, as_tuple=True)
            values = codes[rows, features]
            base = token_start + lo * seq_len
            writer.write(
                (rows + base).cpu().numpy(),
                features.to(torch.int32).cpu().numpy(),
                values.float().cpu().numpy(),
            )
            nll = token_nll(logits, batch)
            positions = (
                base + np.arange(batch.shape[0])[:, None] * seq_len + np.arange(1, seq_len)[None, :]
            )
            nll_tokens.append(positions.reshape(-1))
            nll_values.append(nll.double().cpu().numpy().reshape(-1))
        n_codes = writer.n_rows
    write_nll_shard(nll_path, np.concatenate(nll_tokens), np.concatenate(nll_values), shard_meta)
    seconds = time.perf_counter() - started
    return {
        "n_tokens": shard_meta.n_tokens,
        "n_codes": int(n_codes),
        "l0": n_codes / shard_meta.n_tokens,
        "seconds": seconds,
        "tokens_per_second": shard_meta.n_tokens / seconds,
        "device": str(device),
    }
