"""One forward pass per batch: capture the SAE's hook, encode with the frozen SAE,
write the nonzero codes as a sparse shard, and the per-token NLL beside it."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Collection
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import progress
from .config import FROM_SCHEMA, ConfigSection
from .files import AuditError
from .models import ActivationCapture
from .saes import SaeInput
from .shards import CodeShardWriter, ShardMetadata, read_token_shard, write_nll_shard


class NonFiniteError(AuditError):
    """The forward pass produced NaN or infinity: nothing is written."""


@dataclass(frozen=True)
class EncodeConfig(ConfigSection, section="encode"):
    """Sequences per forward pass, and the device the model jobs run on."""

    batch_size: int = FROM_SCHEMA
    device: str = FROM_SCHEMA
    exclude_special_positions: bool = FROM_SCHEMA


# Logits are scored a chunk of rows at a time. On CPU a chunk that stays in a server's L3
# cache makes the loss one read of the logits, where a whole [batch, seq, vocab]
# log-softmax is written to fresh memory and read back (a tenth of the encode loop);
# smaller chunks would fit L2 but pay more per-op dispatch and thread sync. On a GPU the
# chunk only bounds the memory the loss takes beside the logits.
_NLL_CHUNK_BYTES = {"cpu": 16 << 20}
_NLL_CHUNK_BYTES_DEFAULT = 256 << 20


def target_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL of each target under the logits at its position ([..., vocab] -> [...]).

    The package's one per-token loss: float32 whatever the run dtype. Encode, the
    matched search and the sliding-window evaluation all score with it. Each row is
    `cross_entropy` of its float32 logits, bit-identical to -log_softmax gathered at the
    target; rows are scored a chunk at a time, so no [..., vocab] float32 copy is made.
    """
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)  # a view of contiguous logits
    flat_targets = targets.reshape(-1)
    nll = torch.empty(flat_targets.shape, dtype=torch.float32, device=logits.device)
    chunk_bytes = _NLL_CHUNK_BYTES.get(logits.device.type, _NLL_CHUNK_BYTES_DEFAULT)
    rows = max(1, chunk_bytes // (vocab * 4))
    for lo in range(0, nll.shape[0], rows):
        nll[lo : lo + rows] = F.cross_entropy(
            flat_logits[lo : lo + rows].float(), flat_targets[lo : lo + rows], reduction="none"
        )
    return nll.view(targets.shape)


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, T-1] NLL of tokens 1..T-1 given their prefixes."""
    # Every position is scored against the next token (the last against its sequence's
    # first, then dropped): slicing the logits to T-1 positions would copy them all.
    next_ids = torch.roll(input_ids, -1, dims=1)
    return target_nll(logits, next_ids)[:, :-1].contiguous()


def batch_nll(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """[B, T-1] per-token NLL of one batch: the forward and loss encode and the matched
    search both use, so equal weights give bit-identical numbers on both paths."""
    return token_nll(model(input_ids=batch).logits, batch)


_NON_FINITE_FIX = (
    "try model.dtype: float32 (float16 overflows in some models), check that the checkpoint "
    "loads (`snakemake --forcerun compress`), or a variant this damaged may be beyond auditing"
)


def _first_non_finite(
    values: torch.Tensor, where: str, token_of: Callable[[int, int], int]
) -> None:
    """Raise NonFiniteError naming the first token whose value is NaN or infinite.

    `values` is 2-D; `token_of(row, col)` is the global token position of an element.
    """
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        row, col = (int(i) for i in torch.nonzero(bad)[0])
        raise NonFiniteError(
            f"{where} is {values[row, col].item()} at token {token_of(row, col)}; {_NON_FINITE_FIX}"
        )


@dataclass
class EncodeTarget:
    """One SAE to encode with, where its hook is, and where its code shard goes."""

    sae: Any
    hook: str
    codes_path: str | Path
    sae_name: str  # recorded in the shard metadata
    config_hash: str | None = None  # this SAE's shard provenance hash (else meta's)
    input: SaeInput | None = None  # what the SAE's metadata asks of its input (else as is)


class QualitySums:
    """Sums over encoded positions from which the SAE's reconstruction quality follows.

    float64, added batch by batch and shard by shard (sae_audit.sae_quality): the squared
    reconstruction error, the activations' sum and squared norm (their variance about the
    mean activation), the number of nonzero codes, and which features fired at all.
    """

    def __init__(self, d_in: int, d_sae: int, device: torch.device):
        self.n = 0
        self.n_codes = 0
        self.squared_error = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.fired = torch.zeros(d_sae, dtype=torch.bool, device=device)

    def add(self, x: torch.Tensor, reconstruction: torch.Tensor) -> None:
        """Add a batch of SAE inputs and their reconstructions ([n, d_in] each); the caller
        marks the features that fired in `fired`."""
        x64 = x.double()
        self.n += x.shape[0]
        self.squared_error += (reconstruction.double() - x64).square().sum()
        self.sum_sq += x64.square().sum()
        self.sum += x64.sum(dim=0)

    def to_dict(self) -> dict[str, Any]:
        fired = np.packbits(self.fired.cpu().numpy())
        return {
            "n": self.n,
            "n_codes": self.n_codes,
            "squared_error": float(self.squared_error),
            "sum_sq": float(self.sum_sq),
            "sum": self.sum.cpu().tolist(),
            "d_sae": int(self.fired.numel()),
            "fired": base64.b64encode(fired.tobytes()).decode(),
        }


def sparse_decode(
    sae: Any, codes: torch.Tensor, nonzero: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """`sae.decode(codes)` from the codes' nonzeros (flat indices into `codes`, and their
    values): a sparse product costs L0 x d_in per row where the dense one costs
    d_sae x d_in, which on a CPU would add half again to encode's time at d_sae 32768.

    sae-lens's decode takes a sparse tensor in its matmul (TopK's explicitly); an SAE class
    whose decode does not gets the dense codes.
    """
    n, width = codes.shape
    indices = torch.stack((nonzero // width, nonzero % width))
    sparse = torch.sparse_coo_tensor(indices, values, (n, width), is_coalesced=True)
    try:
        return sae.decode(sparse)
    except (RuntimeError, NotImplementedError, TypeError):
        return sae.decode(codes)


@torch.no_grad()
def encode_shard_multi(
    model: torch.nn.Module,
    targets: list[EncodeTarget],
    token_shard: str | Path,
    nll_path: str | Path,
    meta: dict[str, Any],
    cfg: EncodeConfig,
    device: torch.device,
    special_ids: Collection[int] = (),
) -> dict[str, Any]:
    """One forward pass per batch captures every SAE's hook; each SAE writes its own shard.

    The per-token NLL comes from the same forward pass. Positions whose input token is in
    `special_ids` get no codes and are recorded as excluded in the code shards' metadata
    (the NLL shard scores every token). Each code shard's footer holds the SAE's
    reconstruction sums over the positions it encoded (QualitySums). Returns counts and
    timings.
    """
    seq_idx, ids, _ = read_token_shard(token_shard)
    n_seq, seq_len = ids.shape
    token_start = int(seq_idx[0]) * seq_len
    hooks = sorted({t.hook for t in targets})
    # Flat row n of a batch starting at sequence lo is global position base + n.
    exclude = np.isin(ids, np.fromiter(special_ids, dtype=np.int64)).reshape(-1)
    excluded = tuple(int(t) for t in token_start + np.flatnonzero(exclude))
    nll_meta = ShardMetadata(
        token_start=token_start,
        token_stop=token_start + n_seq * seq_len,
        d_sae=0,
        hook=",".join(hooks),
        sae="",
        **meta,
    )
    nll_tokens: list[np.ndarray] = []
    nll_values: list[np.ndarray] = []
    started = time.perf_counter()
    with ExitStack() as stack:
        writers = [
            stack.enter_context(
                CodeShardWriter(
                    t.codes_path,
                    replace(
                        nll_meta,
                        d_sae=int(t.sae.cfg.d_sae),
                        hook=t.hook,
                        sae=t.sae_name,
                        config_hash=t.config_hash or nll_meta.config_hash,
                        excluded=excluded,
                    ),
                )
            )
            for t in targets
        ]
        dtypes = [next(t.sae.parameters()).dtype for t in targets]
        quality = [QualitySums(int(t.sae.cfg.d_in), int(t.sae.cfg.d_sae), device) for t in targets]
        for lo in progress.bar(
            range(0, n_seq, cfg.batch_size), desc=f"encode {meta['variant']}", unit="batch"
        ):
            batch = torch.from_numpy(ids[lo : lo + cfg.batch_size]).to(device)
            with ActivationCapture(model, hooks) as capture:
                nll = batch_nll(model, batch)
            base = token_start + lo * seq_len
            where = f"model {meta['model']!r}, variant {meta['variant']!r}, shard {token_shard}"
            # A NaN or inf must never reach a shard: it would turn into r = NaN, or into a
            # plausible-looking wrong survival number downstream.
            _first_non_finite(
                nll, f"{where}: NLL", lambda b, t, base=base: base + b * seq_len + t + 1
            )
            rows_kept = np.flatnonzero(
                ~exclude[base - token_start : base - token_start + batch.numel()]
            )
            all_kept = rows_kept.size == batch.numel()
            kept_index = None if all_kept else torch.from_numpy(rows_kept).to(device)
            for target, writer, dtype, sums in zip(targets, writers, dtypes, quality, strict=True):
                acts = capture.activations[target.hook]
                flat = acts.to(dtype).reshape(-1, acts.shape[-1])
                _first_non_finite(
                    flat, f"{where}: activation at {target.hook}", lambda n, _, base=base: base + n
                )
                if kept_index is not None:
                    flat = flat.index_select(0, kept_index)
                if target.input is not None:
                    flat = target.input.prepare(flat)
                codes = target.sae.encode(flat)
                # One nonzero over the flat codes: its indices come out in row-major order,
                # which is (token, feature) order, so the writer has nothing to sort; and a
                # 1-D gather of the values is cheaper than indexing by (row, feature).
                flat_codes = codes.reshape(-1)
                nonzero = torch.nonzero(flat_codes).squeeze(1)
                code_values = flat_codes[nonzero]
                sums.add(flat, sparse_decode(target.sae, codes, nonzero, code_values))
                sums.fired[(nonzero % codes.shape[-1])[code_values > 0]] = True
                values = code_values.float().cpu().numpy()
                rows, features = np.divmod(nonzero.cpu().numpy(), codes.shape[-1])
                if not all_kept:
                    rows = rows_kept[rows]  # a kept row's index in the batch
                finite = np.isfinite(values)
                if not finite.all():
                    first = int(rows[~finite][0])
                    raise NonFiniteError(
                        f"{where}: SAE {target.sae_name!r} codes are non-finite at token "
                        f"{base + first}; {_NON_FINITE_FIX}"
                    )
                writer.write(rows + base, features.astype(np.int32), values)
            positions = (
                base + np.arange(batch.shape[0])[:, None] * seq_len + np.arange(1, seq_len)[None, :]
            )
            nll_tokens.append(positions.reshape(-1))
            nll_values.append(nll.double().cpu().numpy().reshape(-1))
        for target, writer, sums in zip(targets, writers, quality, strict=True):
            sums.n_codes = writer.n_rows
            applied = target.input.to_dict() if target.input is not None else {}
            writer.set_quality({**sums.to_dict(), **applied})
        n_codes = {t.sae_name: w.n_rows for t, w in zip(targets, writers, strict=True)}
    write_nll_shard(nll_path, np.concatenate(nll_tokens), np.concatenate(nll_values), nll_meta)
    seconds = time.perf_counter() - started
    n_tokens = nll_meta.n_tokens
    n_positions = n_tokens - len(excluded)
    return {
        "n_tokens": n_tokens,
        "n_excluded": len(excluded),
        "n_codes": n_codes,
        "l0": {name: n / max(n_positions, 1) for name, n in n_codes.items()},
        "seconds": seconds,
        "tokens_per_second": n_tokens / seconds,
        "device": str(device),
    }
