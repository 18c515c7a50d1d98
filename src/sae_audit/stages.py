"""One function per workflow rule, named like it: paths and config sections in, files out.

The seam between the workflow and the domain modules: each stage reads its
inputs, makes one call into the module of the same name (or the module that does
that work), and writes its outputs atomically or not at all. Every parameter is
keyword-only and named like its CLI flag (`encode_dir` <-> `--encode-dir`): the
CLI (`sae_audit.cli`) is generated from these signatures, and every rule calls
`sae-audit <rule name with dashes>`.

Config sections arrive as their typed dataclass (tests, library use) or as the
JSON slice the CLI parsed; `section()` turns the latter into the former, the one
way a dict becomes a config dataclass.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import polars as pl

from .files import (
    InputError,
    read_json,
    read_parquet,
    rerun_hint,
    write_csv,
    write_json,
    write_parquet,
)
from .shards import Expected, encode_hash
from .tokens import load_token_ids

if TYPE_CHECKING:
    from .causal import CausalConfig
    from .damaged_contexts import ContextConfig
    from .encode import EncodeConfig
    from .fixture import CorpusConfig, ModelTrainConfig, SAETrainConfig, TokenizerConfig
    from .fixture.reparam import ReparamConfig
    from .forecast import ForecastConfig
    from .match_sparsity import MatchedConfig
    from .models import ModelSpec
    from .outliers import OutliersConfig
    from .perplexity import PerplexityConfig
    from .predict import PredictConfig
    from .seed_turnover import SeedTurnoverConfig
    from .stability import StabilityConfig
    from .survival import SurvivalConfig
    from .threshold_grid import ThresholdGridConfig
    from .watchlist import WatchlistConfig

# Model-side stages import torch, transformers and sae-lens inside the function: the
# table stages run in their own processes and should not pay seconds to import them.

log = logging.getLogger("sae_audit")

Stage = Callable[..., Any]
STAGES: dict[str, Stage] = {}
C = TypeVar("C")
F = TypeVar("F", bound=Stage)


def stage(fn: F) -> F:
    """Register a stage under its own name: the rule's name, and the CLI command's."""
    STAGES[fn.__name__] = fn
    return fn


def section(cls: type[C], value: C | Mapping[str, Any], **extra: Any) -> C:
    """A config section as its dataclass: passed through, or built from its JSON slice
    with the class's `from_dict` (config.ConfigSection: schema defaults and bounds)."""
    if isinstance(value, cls):
        return value
    return cls.from_dict(value, **extra)  # type: ignore[attr-defined]


Paths = Sequence[str | Path]


# ---------------------------------------------------------------- the embedded fixture
# Each stage below copies its artifact from the package's bundle (sae_audit.fixture.bundle)
# when `bundle` is true and the bundle was built from this very config and these inputs;
# otherwise it builds it.
@stage
def fixture_corpus(
    *,
    corpus: CorpusConfig | Mapping[str, Any],
    train: str | Path,
    heldout: str | Path,
    bundle: bool = False,
) -> dict[str, Any]:
    """Standard-library docstrings split into train and held-out text (`fixture.corpus`)."""
    from .fixture import CorpusConfig, build_corpus
    from .fixture.bundle import restore

    cfg = section(CorpusConfig, corpus)
    outputs = {"corpus/train.txt": train, "corpus/heldout.txt": heldout}
    if bundle and restore("corpus", cfg, {}, outputs):
        return {"bundled": True}
    return build_corpus(cfg, train, heldout)


@stage
def fixture_tokenizer(
    *,
    tokenizer: TokenizerConfig | Mapping[str, Any],
    train: str | Path,
    out: str | Path,
    bundle: bool = False,
) -> dict[str, Any]:
    """A byte-level BPE trained on the fixture's train text (`fixture.tokenizer`)."""
    from .fixture import TokenizerConfig, train_tokenizer
    from .fixture.bundle import restore

    cfg = section(TokenizerConfig, tokenizer)
    if not (bundle and restore("tokenizer", cfg, {"train": train}, {"tokenizer": out})):
        train_tokenizer(cfg, train, out)
    return {"tokenizer": str(out)}


@stage
def fixture_model(
    *,
    model: ModelTrainConfig | Mapping[str, Any],
    tokenizer: str | Path,
    train: str | Path,
    heldout: str | Path,
    out: str | Path,
    bundle: bool = False,
) -> dict[str, Any]:
    """A small GPT-NeoX trained on the fixture corpus (`fixture.model`)."""
    from .fixture import ModelTrainConfig, train_model
    from .fixture.bundle import restore

    cfg = section(ModelTrainConfig, model)
    inputs = {"tokenizer": tokenizer, "train": train, "heldout": heldout}
    if bundle and restore("model", cfg, inputs, {"model": out}):
        return read_json(Path(out) / "metrics.json")
    return train_model(cfg, tokenizer, train, heldout, out)


def _fixture_sae(
    name: str,
    sae: SAETrainConfig | Mapping[str, Any],
    model: str | Path,
    train: str | Path,
    out: str | Path,
    bundle: bool,
) -> dict[str, Any]:
    from .fixture import SAETrainConfig, train_sae
    from .fixture.bundle import restore

    cfg = section(SAETrainConfig, sae)
    if bundle and restore(name, cfg, {"model": model, "train": train}, {name: out}):
        return read_json(Path(out) / "metrics.json")
    return train_sae(cfg.twin() if name == "sae-twin" else cfg, model, train, out)


@stage
def fixture_sae(
    *,
    sae: SAETrainConfig | Mapping[str, Any],
    model: str | Path,
    train: str | Path,
    out: str | Path,
    bundle: bool = False,
) -> dict[str, Any]:
    """A sae-lens SAE trained on one layer of the fixture model (`fixture.sae`)."""
    return _fixture_sae("sae", sae, model, train, out, bundle)


@stage
def fixture_sae_twin(
    *,
    sae: SAETrainConfig | Mapping[str, Any],
    model: str | Path,
    train: str | Path,
    out: str | Path,
    bundle: bool = False,
) -> dict[str, Any]:
    """The fixture SAE again with `fixture.sae.twin_seed` as its seed (for seed_turnover)."""
    return _fixture_sae("sae-twin", sae, model, train, out, bundle)


@stage
def fixture_reparam(
    *, reparam: ReparamConfig | Mapping[str, Any], model: str | Path, out: str | Path
) -> dict[str, Any]:
    """The planted control (`fixture.reparam`): a function-preserving reparameterized copy of
    the fixture model with one large MLP input column, checked to compute the same logits
    and recorded as what it is (reparam.json); never a trained result."""
    from .fixture.reparam import ReparamConfig, build_reparam

    record = build_reparam(section(ReparamConfig, reparam), model, out)
    log.info("%s: %s", record["what"], {k: record[k] for k in ("scale", "dim", "layers")})
    log.info("function check: %s", record["function_check"])
    return record


@stage
def fixture_training(
    *, artifacts: Mapping[str, str], out: str | Path, report: Paths = ()
) -> pl.DataFrame:
    """The fixture's training metrics, one row per trained artifact (model, SAE, twin SAE).

    Read from the metrics.json each artifact's build recorded (a bundled copy carries its
    build's), with whether it is the package's bundled artifact or was trained in this
    run; `report` writes the table's report forms too (.html and/or .csv)."""
    from .fixture_training import training_table
    from .report_tables import report_table

    table = training_table(artifacts)
    write_parquet(table, out)
    for form in report:
        report_table(out, out=form)
    return table


# ---------------------------------------------------------------- tokens, checkpoints, codes
@stage
def tokenize(
    *, tokens: Mapping[str, Any], tokenizer: str, text: Paths | None = None, out: Paths
) -> dict[str, Any]:
    """Token shards from `models.<name>.tokens`.

    `text` are the local input files (`tokens.paths`, or the fixture's held-out text);
    empty for `source: hf`.
    """
    from .tokens import TokenSetConfig, build_token_set, load_documents, load_tokenizer

    cfg = section(TokenSetConfig, tokens)
    documents = load_documents(dict(tokens), [str(p) for p in text or []])
    log.info("%d documents from tokens.source=%s", len(documents), tokens.get("source"))
    info = build_token_set(documents, load_tokenizer(tokenizer), cfg, list(out))
    return info


@stage
def tokenize_calibration(
    *,
    calibration: Mapping[str, Any],
    tokenizer: str,
    text: Paths | None = None,
    tokens: Paths,
    out: str | Path,
) -> dict[str, Any]:
    """The calibration token set of llm-compressor variants (`models.<name>.calibration`),
    one file, checked to share no window with the evaluation token shards `tokens`."""
    from .tokens import TokenSetConfig, build_token_set, check_disjoint, load_documents
    from .tokens import load_tokenizer as load_tok

    cfg = section(TokenSetConfig, calibration)
    documents = load_documents(dict(calibration), [str(p) for p in text or []])
    log.info("%d documents from calibration.source=%s", len(documents), calibration.get("source"))
    info = build_token_set(documents, load_tok(tokenizer), cfg, [out])
    try:
        check_disjoint(load_token_ids([out]), load_token_ids(list(tokens)), what=str(out))
    except ValueError:
        Path(out).unlink()  # a calibration set that overlaps is not left for a rerun to use
        raise
    return info


@stage
def compress(
    *,
    model: ModelSpec | Mapping[str, Any],
    base: str,
    variant: str,
    matched: Paths | None = None,
    entry: Mapping[str, Any] | None = None,
    calibration: Paths | None = None,
    plan: Paths | None = None,
    out: str | Path,
) -> str:
    """One variant's checkpoint from the base model; `matched` is the search result
    (at most one file) that gives a matched-pruning variant its sparsity. The noise null
    (fp-noise) records the other dtype than `model.dtype` to run in.

    Shipped formats (lc-, gguf-, ext-) take their config `entry` (compression.<section>.<key>);
    llm-compressor variants also the calibration token set (`calibration`); protect- variants
    the directory their protect job wrote (`plan`, at most one), whose plan.json they build.
    """
    from .checkpoints import read_manifest, write_checkpoint
    from .models import ModelSpec

    spec = section(ModelSpec, model)
    calibration_ids = load_token_ids(list(calibration)) if calibration else None
    searches = list(matched or [])
    if len(searches) > 1:
        raise ValueError(f"compress: at most one matched-search result, got {searches}")
    sparsity = None
    extra: dict[str, Any] = {}
    if searches:
        search = read_json(searches[0], "match_sparsity")
        sparsity = float(search["sparsity"])
        extra["matched_search"] = search
    plans = list(plan or [])
    if len(plans) > 1:
        raise ValueError(f"compress: at most one protect plan, got {plans}")
    chosen = read_json(Path(plans[0]) / "plan.json", "protect") if plans else None
    path = write_checkpoint(
        base,
        variant,
        out,
        revision=spec.revision,
        sparsity=sparsity,
        extra=extra,
        entry=dict(entry) if entry else None,
        calibration=calibration_ids,
        dtype=spec.dtype,  # only fp-noise reads it (the rule passes it for that variant alone)
        plan=chosen,
    )
    log.info("wrote %s (%s)", path, read_manifest(path)["method"])
    return str(path)


@stage
def match_sparsity(
    *,
    model: ModelSpec | Mapping[str, Any],
    matched: MatchedConfig | Mapping[str, Any],
    encode: EncodeConfig | Mapping[str, Any],
    base: str,
    target: str,
    target_nll: Paths,
    tokens: Paths,
    fp_nll: Paths | None = None,
    model_name: str | None = None,
    out: str | Path,
) -> dict[str, Any]:
    """Search the pruning sparsity whose pruned model's perplexity matches the target's
    (`match_sparsity.interpolate_sparsity`).

    The target's perplexity comes from its encode NLL shards (no second forward pass),
    restricted to the same sequences the search evaluates, and so does the FP model's
    (`fp_nll`), which is the perplexity at sparsity 0: the search interpolates from it
    when the bracket starts at lo = 0. The search runs the model as encode does
    (`match_sparsity.PruneSearch`).
    """
    from .encode import EncodeConfig
    from .match_sparsity import MatchedConfig, PruneSearch
    from .match_sparsity import match_sparsity as search_sparsity
    from .models import ModelSpec, resolve_device
    from .perplexity import chunked_perplexity

    spec = section(ModelSpec, model)
    enc = section(EncodeConfig, encode)
    cfg = section(MatchedConfig, matched, target=target)
    device = resolve_device(enc.device)
    ids = load_token_ids(tokens)
    n_seq = min(cfg.n_sequences or len(ids), len(ids))  # the search's prefix of the token set
    ids = ids[:n_seq]
    target_ppl = chunked_perplexity(
        [Path(p) for p in target_nll],
        token_stop=n_seq * ids.shape[1],
        variant=target,
        expect=Expected(model=model_name),
    )["perplexity"]
    # Pruning nothing is the FP model, which encode has scored already.
    lo_ppl = (
        chunked_perplexity(
            [Path(p) for p in fp_nll],
            token_stop=n_seq * ids.shape[1],
            variant="fp",
            expect=Expected(model=model_name),
        )["perplexity"]
        if fp_nll and cfg.lo == 0.0
        else None
    )
    search = PruneSearch(
        base,
        target,
        dtype=spec.dtype,
        revision=spec.revision,
        attn_implementation=spec.attn_implementation,
        device=device,
    )
    found = search_sparsity(
        search, ids, target_ppl, cfg, batch_size=enc.batch_size, lo_perplexity=lo_ppl
    )
    result = {
        "target": target,
        "target_perplexity": target_ppl,
        "sparsity": found.sparsity,
        "trace": [{"step": s, "sparsity": x, "perplexity": p} for s, x, p in found.trace],
        "n_sequences": int(n_seq),
        "params": {k: v for k, v in cfg.to_dict().items() if k != "target"},
        "method": found.method,
        "stopped": found.stopped,
        "lo_perplexity": lo_ppl,  # ppl at lo known without a forward pass (null: none)
    }
    write_json(out, result)
    return result


@stage
def encode(
    *,
    model: ModelSpec | Mapping[str, Any],
    saes: Mapping[str, Mapping[str, Any]],
    encode: EncodeConfig | Mapping[str, Any],
    checkpoint: str | Path,
    sae_path: Mapping[str, str] | None = None,
    tokens: str | Path,
    codes_dir: str | Path,
    nll: str | Path,
    model_name: str,
    bos: bool = False,
    tokenizer: str | None = None,
) -> dict[str, Any]:
    """Encode one token shard with every SAE of the model: codes_dir/<sae name>.parquet each.

    `sae_path` gives the directory of SAEs that live on disk (the fixture's, or a
    configured path); the others load by release and id. Each SAE's metadata says what
    its input needs (`saes.sae_input`: centering, normalization, BOS); the log says what
    was applied. With `encode.exclude_special_positions` the tokenizer's special tokens
    are found in the shard and their positions excluded.
    """
    import torch

    from .checkpoints import load_checkpoint, read_manifest
    from .encode import EncodeConfig, EncodeTarget, encode_shard_multi
    from .models import ModelSpec, resolve_device
    from .saes import check_compatible, load_sae, sae_input

    spec = section(ModelSpec, model)
    cfg = section(EncodeConfig, encode)
    # The provenance hash the workflow recomputes from the config (shard_expectation).
    model_params, encode_params = spec.to_dict(), cfg.to_dict()
    device = resolve_device(cfg.device)
    # What the scheduler handed this job, beside what the code uses: a GPU job on a node
    # without CUDA runs on CPU (e.g. SLURM sets CUDA_VISIBLE_DEVICES but no driver exists).
    log.info(
        "CUDA_VISIBLE_DEVICES=%s cuda_available=%s device=%s",
        os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"),
        torch.cuda.is_available(),
        device,
    )
    manifest = read_manifest(checkpoint)
    net = load_checkpoint(
        checkpoint,
        dtype=spec.dtype,
        device=device,
        attn_implementation=spec.attn_implementation,
    )
    targets = []
    for name, sae_spec in saes.items():
        sae = load_sae(dict(sae_spec), device=device, path=(sae_path or {}).get(name))
        hook = check_compatible(net, sae)
        prepared = sae_input(sae, name, bos)
        log.info("SAE %r input: %s", name, prepared.describe())
        if prepared.bos_mismatch:
            log.warning(
                "SAE %r was trained %s a BOS token at the start of each sequence but "
                "models.%s.tokens.bos is %s: its codes are measured anyway (the sae_quality "
                "table shows how well it reconstructs); set tokens.bos to %s to match it",
                name,
                "with" if prepared.prepend_bos else "without",
                model_name,
                str(bos).lower(),
                str(prepared.prepend_bos).lower(),
            )
        shard = Path(codes_dir) / f"{name}.parquet"
        shard_hash = encode_hash(model_params, encode_params, sae_spec)
        targets.append(EncodeTarget(sae, hook, shard, name, config_hash=shard_hash, input=prepared))
    special_ids: list[int] = []
    if cfg.exclude_special_positions:
        if tokenizer is None:
            raise ValueError("encode.exclude_special_positions needs the tokenizer (--tokenizer)")
        from .tokens import load_tokenizer

        tok = load_tokenizer(tokenizer, revision=spec.revision)
        special_ids = sorted({int(i) for i in tok.all_special_ids})
        log.info("excluding positions of special tokens %s", special_ids)
    meta = {
        "model": model_name,
        "variant": manifest["variant"],
        "config_hash": encode_hash(model_params, encode_params),
    }
    info = encode_shard_multi(net, targets, tokens, nll, meta, cfg, device, special_ids)
    log.info(
        "%d positions encoded (%d excluded), L0 %s",
        info["n_tokens"] - info["n_excluded"],
        info["n_excluded"],
        {k: round(v, 2) for k, v in info["l0"].items()},
    )
    return info


@stage
def sliding_perplexity(
    *,
    model: ModelSpec | Mapping[str, Any],
    perplexity: PerplexityConfig | Mapping[str, Any],
    encode: EncodeConfig | Mapping[str, Any],
    bos: bool = False,
    checkpoint: str | Path,
    tokens: Paths,
    tokenizer: str,
    out: str | Path,
) -> dict[str, Any]:
    """Strided sliding-window perplexity over the token set read as one stream.

    `bos` is `tokens.bos`: a BOS the token set put at the start of every sequence
    is dropped first, so the stream is the text itself; the evaluation adds its own
    BOS per window (`perplexity.bos`).
    """
    import torch

    from .checkpoints import load_checkpoint, read_manifest
    from .encode import EncodeConfig, NonFiniteError
    from .models import ModelSpec, resolve_device
    from .perplexity import PerplexityConfig
    from .sliding_perplexity import sliding_window_nll
    from .tokens import load_tokenizer

    spec = section(ModelSpec, model)
    ppl = section(PerplexityConfig, perplexity)
    enc = section(EncodeConfig, encode)
    device = resolve_device(enc.device)
    ids = load_token_ids(tokens)
    bos_id = load_tokenizer(tokenizer, revision=spec.revision).bos_token_id
    if bos and bos_id is not None:
        ids = ids[:, 1:]
    stream = torch.from_numpy(ids.reshape(-1))
    net = load_checkpoint(
        checkpoint,
        dtype=spec.dtype,
        device=device,
        attn_implementation=spec.attn_implementation,
    )
    window_bos = bos_id if ppl.bos else None
    nll_sum, n_scored = sliding_window_nll(
        net,
        stream,
        window=ppl.window,
        stride=ppl.stride,
        bos_id=window_bos,
        batch_size=enc.batch_size,
        device=device,
    )
    variant = read_manifest(checkpoint)["variant"]
    if not np.isfinite(nll_sum):
        raise NonFiniteError(
            f"sliding-window perplexity of {variant!r} ({checkpoint}) is non-finite "
            f"(NLL sum {nll_sum}); try model.dtype: float32, or re-make the checkpoint with "
            "`snakemake --cores all --forcerun compress`"
        )
    result = {
        "variant": variant,
        "nll_sum": nll_sum,
        "n_scored": n_scored,
        "perplexity": float(np.exp(nll_sum / n_scored)),
        "window": ppl.window,
        "stride": ppl.stride,
        "bos": window_bos,
    }
    write_json(out, result)
    return result


@stage
def outliers(
    *,
    model: ModelSpec | Mapping[str, Any],
    outliers: OutliersConfig | Mapping[str, Any],
    encode: EncodeConfig | Mapping[str, Any],
    base: str,
    tokens: Paths,
    out: str | Path,
) -> dict[str, Any]:
    """Outlier diagnostics of the FP model (`outliers.outlier_table`): per block matrix
    and per layer's residual stream on the first `outliers.n_sequences` evaluation
    sequences; the device is `encode.device`."""
    from .checkpoints import load_run_model
    from .encode import EncodeConfig
    from .models import ModelSpec, resolve_device
    from .outliers import OutliersConfig, outlier_table, summarize

    spec = section(ModelSpec, model)
    device = resolve_device(section(EncodeConfig, encode).device)
    net = load_run_model(
        base,
        dtype=spec.dtype,
        revision=spec.revision,
        attn_implementation=spec.attn_implementation,
        device=device,
    )
    table = outlier_table(net, load_token_ids(tokens), section(OutliersConfig, outliers), device)
    write_parquet(table, out)
    summary = summarize(table)
    return summary


@stage
def causal(
    *,
    model: ModelSpec | Mapping[str, Any],
    saes: Mapping[str, Mapping[str, Any]],
    encode: EncodeConfig | Mapping[str, Any],
    causal: CausalConfig | Mapping[str, Any],
    analysis: SurvivalConfig | Mapping[str, Any] | None = None,
    fp_checkpoint: str | Path,
    checkpoint: str | Path,
    sae_path: Mapping[str, str] | None = None,
    tokens: Paths,
    fp_stats: str | Path,
    tokenizer: str | None = None,
    out: str | Path,
) -> dict[str, Any]:
    """Causal survival of one variant under one SAE: per selected feature, its ablation,
    steering and direct logit effects in FP and in the variant, their agreement and causal
    class (`causal.causal_table`).

    Both models load through `load_checkpoint` (the deployed forward, as encode), the SAE
    as encode loads it (`saes` names exactly one). Features come from the FP statistics
    (`causal.features`: top, random or watchlist; active means FP firing rate above
    `analysis.active_rate`); the interventions run on the first `causal.n_sequences`
    sequences of `tokens`. With `encode.exclude_special_positions` nothing is ablated at
    the tokenizer's special tokens, where encode writes no codes.
    """
    from .causal import CausalConfig, causal_table, empty_table, select_features
    from .checkpoints import load_checkpoint, read_manifest
    from .encode import EncodeConfig
    from .models import ModelSpec, resolve_device
    from .saes import check_compatible, load_sae, sae_input
    from .survival import SurvivalConfig

    spec = section(ModelSpec, model)
    enc = section(EncodeConfig, encode)
    cfg = section(CausalConfig, causal)
    active_rate = (
        SurvivalConfig() if analysis is None else section(SurvivalConfig, analysis)
    ).active_rate
    if len(saes) != 1:
        raise ValueError(f"causal measures one SAE at a time, got {sorted(saes)}")
    ((name, sae_spec),) = saes.items()
    variant = read_manifest(checkpoint)["variant"]
    if not cfg.enabled:
        write_parquet(empty_table(), out)
        log.info("causal.enabled is false: wrote an empty table")
        return {"variant": variant, "n_features": 0}
    device = resolve_device(enc.device)
    selected = select_features(read_parquet(fp_stats), cfg, active_rate)
    ids = load_token_ids(tokens)[: cfg.n_sequences]
    ablate = None
    if enc.exclude_special_positions:
        if tokenizer is None:
            raise ValueError("encode.exclude_special_positions needs the tokenizer (--tokenizer)")
        from .tokens import load_tokenizer

        tok = load_tokenizer(tokenizer, revision=spec.revision)
        ablate = ~np.isin(ids, sorted({int(i) for i in tok.all_special_ids}))
    nets = [
        load_checkpoint(c, dtype=spec.dtype, device=device,
                        attn_implementation=spec.attn_implementation)
        for c in (fp_checkpoint, checkpoint)
    ]  # fmt: skip
    sae = load_sae(dict(sae_spec), device=device, path=(sae_path or {}).get(name))
    for net in nets:
        check_compatible(net, sae)
    prepared = sae_input(sae, name, False)
    log.info(
        "causal %s: %d features (%s), %d sequences, %d features per forward on %s",
        variant, selected.height, cfg.features, ids.shape[0], cfg.features_per_forward, device,
    )  # fmt: skip
    table = causal_table(
        nets[0], nets[1], sae, prepared, selected, ids, cfg,
        variant=variant, device=device, ablate=ablate,
    )  # fmt: skip
    write_parquet(table, out)
    return {
        "variant": variant,
        "n_features": table.height,
        "mean_agreement": (
            float(np.mean(table["causal_agreement"].to_numpy())) if table.height else None
        ),
    }


# ---------------------------------------------------------------- tables
@stage
def fp_stats(
    *, codes: Paths, expect: Mapping[str, Any] | None = None, out: str | Path
) -> dict[str, Any]:
    """Per-feature firing statistics of the FP model's codes under one SAE."""
    from .fp_stats import fp_feature_stats

    table = fp_feature_stats(
        [Path(p) for p in codes], expect=Expected.from_dict(expect), variant="fp"
    )
    write_parquet(table, out)
    return {"d_sae": table.height, "n_fired": int((table["firing_count"] > 0).sum())}


@stage
def sae_quality(
    *, codes: Mapping[str, Paths], expect: Mapping[str, Any] | None = None, out: str | Path
) -> pl.DataFrame:
    """The SAE's quality on each variant's activations: explained variance, MSE, L0, dead fraction."""
    from .sae_quality import sae_quality_table

    table = sae_quality_table(codes, Expected.from_dict(expect))
    write_parquet(table, out)
    for row in table.iter_rows(named=True):
        log.info(
            "%s: explained variance %s, L0 %s, dead fraction %.3f",
            row["variant"],
            "n/a" if row["explained_variance"] is None else f"{row['explained_variance']:.4f}",
            "n/a" if row["l0"] is None else f"{row['l0']:.2f}",
            row["dead_fraction"],
        )
    return table


@stage
def correlate(
    *,
    fp: Paths,
    variant: Paths,
    variant_name: str | None = None,
    expect: Mapping[str, Any] | None = None,
    analysis: SurvivalConfig | Mapping[str, Any] | None = None,
    out: str | Path,
) -> dict[str, Any]:
    """Per-feature Pearson r between the FP and one variant's codes, with its support and
    its interval at `analysis.confidence` (the rule passes only that key, so changing a
    class threshold re-runs no correlation)."""
    from .correlate import correlate_variant
    from .survival import SurvivalConfig

    table = correlate_variant(
        [Path(p) for p in fp],
        [Path(p) for p in variant],
        variant=variant_name,
        expect=Expected.from_dict(expect),
        confidence=(
            SurvivalConfig() if analysis is None else section(SurvivalConfig, analysis)
        ).confidence,
    )
    write_parquet(table, out)
    return {"n_features": table.height, "flags": table["flag"].value_counts().to_dicts()}


@stage
def perplexity(
    *,
    nll: Mapping[str, Paths],
    sliding: Mapping[str, str] | None = None,
    expect: Mapping[str, Any] | None = None,
    out: str | Path,
) -> pl.DataFrame:
    """Chunked (from encode NLL shards) and sliding-window perplexity per variant, with % change vs FP.

    Every NLL shard must say it is of the variant it is listed under (and of
    `expect["model"]`), and so must every sliding-window result.
    """
    from .perplexity import chunked_perplexity, perplexity_table

    expected = Expected.from_dict(expect)
    chunked = {
        name: chunked_perplexity([Path(p) for p in paths], variant=name, expect=expected)
        for name, paths in nll.items()
    }
    windows = {}
    for name, path in (sliding or {}).items():
        windows[name] = read_json(path, "sliding_perplexity")
        if windows[name].get("variant") != name:
            raise InputError(
                f"{path}: holds variant {windows[name].get('variant')!r}, listed as "
                f"{name!r}; {rerun_hint('sliding_perplexity')}"
            )
    table = perplexity_table(chunked, windows)
    write_parquet(table, out)
    return table


@stage
def survival(
    *,
    analysis: SurvivalConfig | Mapping[str, Any],
    fp_stats: str | Path,
    correlation: Mapping[str, str],
    perplexity: str | Path,
    features_out: str | Path,
    summary_out: str | Path,
    seed_turnover: Paths = (),
    matched: Mapping[str, str] | None = None,
) -> pl.DataFrame:
    """Per-feature classes for every variant (long table) and the per-variant summary;
    with a seed_turnover table (at most one), the seed-stability shares too; pruning
    variants' sparsity (matched ones from their search results, `matched`)."""
    from .survival import SurvivalConfig, survival_tables, with_sparsity

    if len(seed_turnover) > 1:
        raise InputError(f"survival takes at most one seed_turnover table, got {seed_turnover}")
    features, summary = survival_tables(
        read_parquet(fp_stats),
        {name: read_parquet(path) for name, path in correlation.items()},
        read_parquet(perplexity),
        section(SurvivalConfig, analysis),
        read_parquet(seed_turnover[0]) if seed_turnover else None,
    )
    chosen = {name: read_json(path)["sparsity"] for name, path in (matched or {}).items()}
    summary = with_sparsity(summary, chosen)
    write_parquet(features, features_out)
    write_csv(features, Path(features_out).with_suffix(".csv"))
    write_parquet(summary, summary_out)
    write_csv(summary, Path(summary_out).with_suffix(".csv"))
    return summary


@stage
def seed_turnover(
    *,
    seed_turnover: SeedTurnoverConfig | Mapping[str, Any],
    sae: str | Path,
    twin: str | Path,
    out: str | Path,
) -> pl.DataFrame:
    """Per feature of the SAE: the best decoder cosine to the twin SAE (another seed), and
    whether it is seed-stable (`seed_turnover.stable`)."""
    from .seed_turnover import SeedTurnoverConfig, read_decoder, turnover_table

    table = turnover_table(
        read_decoder(sae), read_decoder(twin), section(SeedTurnoverConfig, seed_turnover)
    )
    write_parquet(table, out)
    log.info("seed-stable features: %d of %d", int(table["stable"].sum()), table.height)
    return table


def _by_variant(features_path: str | Path) -> dict[str, pl.DataFrame]:
    features = read_parquet(features_path)
    return {str(k[0]): t for k, t in features.group_by("variant", maintain_order=True)}


@stage
def predict(
    *, predict: PredictConfig | Mapping[str, Any], features: str | Path, out_dir: str | Path
) -> pl.DataFrame:
    """Survival predictor for every compressed variant, plus survival by predictor quantile."""
    from .predict import PredictConfig, predict_tables

    tables = predict_tables(_by_variant(features), section(PredictConfig, predict))
    out = Path(out_dir)
    write_parquet(tables.summary, out / "predict.parquet")
    write_parquet(tables.coefficients, out / "predict_coefficients.parquet")
    write_parquet(tables.oof, out / "predict_oof.parquet")
    write_parquet(tables.quantiles, out / "survival_by_quantile.parquet")
    return tables.summary


@stage
def overlap(*, pairs: list[list[str]], features: str | Path, out: str | Path) -> pl.DataFrame:
    """Jaccard of non-surviving/blurred/destroyed sets and damage rank correlation per variant pair."""
    from .overlap import overlap_table

    table = overlap_table(_by_variant(features), pairs)
    write_parquet(table, out)
    return table


@stage
def stability(
    *,
    stability: StabilityConfig | Mapping[str, Any],
    analysis: SurvivalConfig | Mapping[str, Any],
    seq_len: int,
    fp: Paths,
    codes: Mapping[str, Paths],
    expect: Mapping[str, Any] | None = None,
    out: str | Path,
) -> pl.DataFrame:
    """Class shares at nested token budgets and random sequence subsets."""
    from .stability import StabilityConfig, stability_table
    from .survival import SurvivalConfig

    table = stability_table(
        fp,
        codes,
        expect=Expected.from_dict(expect),
        check_variants=True,
        seq_len=seq_len,
        survival=section(SurvivalConfig, analysis),
        cfg=section(StabilityConfig, stability),
    )
    write_parquet(table, out)
    return table


@stage
def threshold_grid(
    *,
    threshold_grid: ThresholdGridConfig | Mapping[str, Any],
    features: str | Path,
    out: str | Path,
) -> pl.DataFrame:
    """Class shares over a grid of survived / destroyed thresholds."""
    from .threshold_grid import ThresholdGridConfig
    from .threshold_grid import threshold_grid as grid

    table = grid(_by_variant(features), section(ThresholdGridConfig, threshold_grid))
    write_parquet(table, out)
    return table


@stage
def damaged_contexts(
    *,
    damaged_contexts: ContextConfig | Mapping[str, Any],
    features: str | Path,
    fp: Paths,
    codes: Mapping[str, Paths],
    tokens: Paths,
    tokenizer: str,
    expect: Mapping[str, Any] | None = None,
    out: str | Path,
) -> pl.DataFrame:
    """The most damaged features' top FP contexts, and the variant's activation there."""
    from .damaged_contexts import ContextConfig
    from .damaged_contexts import damaged_contexts as find
    from .tokens import load_tokenizer

    table = find(
        read_parquet(features).filter(pl.col("variant").is_in(list(codes))),
        fp,
        codes,
        load_token_ids(tokens),
        load_tokenizer(tokenizer),
        section(ContextConfig, damaged_contexts),
        expect=Expected.from_dict(expect),
        check_variants=True,
    )
    write_parquet(table, out)
    write_csv(table, Path(out).with_suffix(".csv"))
    return table


@stage
def causal_survival(
    *,
    damaged_contexts: ContextConfig | Mapping[str, Any],
    thresholds: Mapping[str, float],
    causal: Mapping[str, str],
    features: str | Path,
    fp: Paths,
    codes: Mapping[str, Paths],
    tokens: Paths,
    tokenizer: str,
    expect: Mapping[str, Any] | None = None,
    out: str | Path,
    summary_out: str | Path,
    disagreements_out: str | Path,
) -> pl.DataFrame:
    """Causal survival beside Pearson survival: every measured feature with both classes
    (its causal class at `thresholds`), the per-variant summary, and the features where
    the two disagree, with their contexts."""
    from .causal_survival import causal_summary, disagreements, join_pearson
    from .damaged_contexts import ContextConfig
    from .tokens import load_tokenizer

    frames = [read_parquet(path, "causal") for path in causal.values()]
    table = join_pearson(
        pl.concat(frames, how="vertical"), read_parquet(features, "survival"), thresholds
    )
    write_parquet(table, out)
    summary = causal_summary(table)
    write_parquet(summary, summary_out)
    write_csv(summary, Path(summary_out).with_suffix(".csv"))
    found = disagreements(
        table,
        fp,
        codes,
        load_token_ids(tokens),
        load_tokenizer(tokenizer),
        section(ContextConfig, damaged_contexts),
        Expected.from_dict(expect),
    )
    write_parquet(found, disagreements_out)
    write_csv(found, Path(disagreements_out).with_suffix(".csv"))
    for row in summary.iter_rows(named=True):
        log.info(
            "%s: %d features, causal survived %.1f%% (Pearson %.1f%%), same class %s%%, "
            "%d fire the same but act differently, %d act the same but fire differently",
            row["variant"], row["n_features"], row["causal_survived_pct"] or 0.0,
            row["pearson_survived_pct"] or 0.0,
            "n/a" if row["same_class_pct"] is None else f"{row['same_class_pct']:.1f}",
            row["n_fires_same_acts_differently"], row["n_acts_same_fires_differently"],
        )  # fmt: skip
    return summary


@stage
def feature_table(
    *,
    features: str | Path,
    contexts: str | Path,
    sae_spec: Mapping[str, Any] | None = None,
    title: str = "features",
    out: str | Path,
) -> pl.DataFrame:
    """The report's interactive per-feature table (HTML, itables) of one basis: every
    active feature's FP statistics, r and class per variant, top context where most
    damaged, and a Neuronpedia link where the SAE (`sae_spec`: its config entry) has one."""
    from .feature_table import feature_table as build
    from .feature_table import neuronpedia_id, render_html

    spec = sae_spec or {}
    table = build(read_parquet(features), read_parquet(contexts), neuronpedia_id(spec))
    render_html(table, out, title)
    return table


@stage
def reference_comparison(
    *, reference: str | Path, tables_dir: str | Path, perplexity: str | Path, out: str | Path
) -> pl.DataFrame:
    """Published results beside this run's (config `models.<name>.reference`)."""
    from .reference_comparison import compare

    tables = Path(tables_dir)
    table = compare(
        reference,
        read_parquet(tables / "survival.parquet"),
        read_parquet(perplexity),
        read_parquet(tables / "predict.parquet"),
        read_parquet(tables / "overlap.parquet"),
    )
    write_parquet(table, out)
    return table


@stage
def equal_bits(
    *,
    damaged_contexts: ContextConfig | Mapping[str, Any],
    pairs: list[list[str]],
    features: str | Path,
    fp: Paths,
    codes: Mapping[str, Paths] | None = None,
    tokens: Paths,
    tokenizer: str,
    expect: Mapping[str, Any] | None = None,
    out: str | Path,
) -> pl.DataFrame:
    """Per (RTN, shipped) pair at the same bits: the features the shipped format saves that
    RTN destroys and back, with their top FP contexts (`damaged_contexts.n_features` each).
    `codes` holds the code shards of the paired variants only (none without pairs)."""
    from .damaged_contexts import ContextConfig
    from .equal_bits import equal_bits as compare
    from .tokens import load_tokenizer

    table = compare(
        _by_variant(features),
        pairs,
        fp,
        codes or {},
        load_token_ids(tokens),
        load_tokenizer(tokenizer),
        section(ContextConfig, damaged_contexts),
        expect=Expected.from_dict(expect),
        check_variants=True,
    )
    write_parquet(table, out)
    return table


@stage
def table_docs(*, out: str | Path) -> dict[str, Any]:
    """The columns of every output table (the package's tables.schema.yaml) as one page.

    The format is `out`'s suffix: .html (the report's page), .md or .rst."""
    from .table_docs import write_docs

    return write_docs(out)


# ---------------------------------------------------------------- acting on the audit
def _one_sae(
    saes: Mapping[str, Mapping[str, Any]],
    sae_path: Mapping[str, str] | None,
    device: Any,
    stage_name: str,
) -> tuple[str, Any]:
    """The one SAE a forecast or protect job reads (`saes` names exactly one), loaded."""
    from .saes import load_sae

    if len(saes) != 1:
        raise ValueError(f"{stage_name} reads one SAE at a time, got {sorted(saes)}")
    ((name, sae_spec),) = saes.items()
    return name, load_sae(dict(sae_spec), device=device, path=(sae_path or {}).get(name))


def _forecast_model(spec: ModelSpec, base: str, device: Any) -> Any:
    """The FP model as the forecast runs it: float32 (forward-mode AD in half precision
    would drown the first-order terms) and eager attention (forward-AD formulas exist for
    its matmuls and softmax, not for every fused attention kernel)."""
    from .models import load_model

    return load_model(
        base, dtype="float32", revision=spec.revision, attn_implementation="eager", device=device
    )


@stage
def forecast(
    *,
    model: ModelSpec | Mapping[str, Any],
    saes: Mapping[str, Mapping[str, Any]],
    encode: Mapping[str, Any],
    forecast: ForecastConfig | Mapping[str, Any],
    variants: Mapping[str, Any],
    matched: Mapping[str, str] | None = None,
    base: str,
    sae_path: Mapping[str, str] | None = None,
    tokens: Paths,
    bos: bool = False,
    out: str | Path,
    sources_out: str | Path,
) -> dict[str, Any]:
    """Each variant's forecast feature damage from the FP model alone (`forecast`): its
    noise model (`forecast.scheme_for_variant`: the variant's name, its config entry in
    `variants`, a matched variant's searched sparsity from `matched`) propagated per
    block matrix to every feature of the one SAE in `saes`, on the first
    `forecast.n_sequences` sequences of `tokens`. Variants without a noise model are
    skipped and logged. The per-source table also holds the leave-one-module-quantized
    measurement of the variants in `forecast.measure`.
    """
    from .forecast import (
        ForecastConfig,
        forecast_table,
        forecast_variances,
        measure_source_variances,
        scheme_for_variant,
        source_table,
    )
    from .models import ModelSpec, resolve_device, target_weights
    from .saes import check_compatible, sae_input
    from .variants import parse_variant

    spec = section(ModelSpec, model)
    cfg = section(ForecastConfig, forecast)
    device = resolve_device(str(encode.get("device", "auto")))
    net = _forecast_model(spec, base, device)
    name, sae = _one_sae(saes, sae_path, device, "forecast")
    check_compatible(net, sae)
    prepared = sae_input(sae, name, bos)
    schemes = []
    for variant, entry in variants.items():
        sparsity = None
        if matched and variant in matched:
            sparsity = float(read_json(matched[variant], "match_sparsity")["sparsity"])
        scheme = scheme_for_variant(parse_variant(variant), entry, sparsity)
        if scheme is None:
            log.info("%s: no noise model, not forecast", variant)
            continue
        schemes.append(scheme)
    ids = load_token_ids(tokens)[: cfg.n_sequences]
    import torch

    token_tensor = torch.as_tensor(ids, dtype=torch.long)
    result = forecast_variances(
        net, sae, prepared, token_tensor, schemes,
        n_samples=cfg.n_samples, seed=cfg.seed, batch_size=cfg.batch_size, device=device,
    )  # fmt: skip
    weights = [n for n, _ in target_weights(net) if n in result.sources]
    measured = {}
    for variant in cfg.measure:
        scheme = next((s for s in schemes if s.name == variant), None)
        if scheme is None:
            raise InputError(f"forecast.measure: {variant!r} is not forecast (no noise model)")
        measured[variant] = measure_source_variances(
            net, sae, prepared, token_tensor, scheme, weights,
            batch_size=cfg.batch_size, device=device,
        )  # fmt: skip
    table = forecast_table(result)
    sources = source_table(result, measured=measured or None, sources_measured=weights)
    write_parquet(table, out)
    write_parquet(sources, sources_out)
    return {
        "variants": len(schemes),
        "sources": len(result.sources),
        "tokens": result.n_tokens,
        "top_sources": sources.filter(pl.col("forecast_rank") == 1).select(
            "variant", "source", "forecast_fraction"
        ),
    }


@stage
def forecast_accuracy(
    *,
    forecast: str | Path,
    features: str | Path,
    fit_on: list[str] | None = None,
    predict: PredictConfig | Mapping[str, Any] | None = None,
    out: str | Path,
) -> pl.DataFrame:
    """The forecast against the measured classes (`forecast.forecast_accuracy`): per
    variant the Spearman of forecast and measured damage, the forecast's AUC for not
    survived, the FP-statistics predictor (section `predict`: its predictors, folds and
    seed) with and without it (CV AUC), and, fitted on each variant of `fit_on`, its AUC on
    every other variant (transfer)."""
    from .forecast import forecast_accuracy as accuracy
    from .predict import PredictConfig

    cfg = PredictConfig() if predict is None else section(PredictConfig, predict)
    table = accuracy(
        read_parquet(forecast),
        read_parquet(features),
        fit_on=fit_on or (),
        seed=cfg.seed,
        predictors=cfg.predictors,
        folds=cfg.folds,
    )
    write_parquet(table, out)
    return table


@stage
def protect(
    *,
    model: ModelSpec | Mapping[str, Any],
    saes: Mapping[str, Mapping[str, Any]],
    encode: Mapping[str, Any],
    forecast: ForecastConfig | Mapping[str, Any],
    entry: Mapping[str, Any],
    watchlist: WatchlistConfig | Mapping[str, Any],
    analysis: SurvivalConfig | Mapping[str, Any],
    base: str,
    sae_path: Mapping[str, str] | None = None,
    tokens: Paths,
    bos: bool = False,
    fp_stats: str | Path,
    out: str | Path,
) -> dict[str, Any]:
    """A protect recipe (`protect`): the watchlist's features forecast under every level of
    `entry.levels` per block matrix, the levels chosen within `entry.budget` to keep the
    most of them above `entry.survived_r` (default analysis.survived), written to the
    directory `out`: plan.json (what compress builds), protect.json (the watchlist and the
    predictions beside the plain base), plan.parquet, quantization_config.json
    (compressed-tensors), recipe.yaml (llm-compressor) and tensor_types.txt (GGUF)."""
    import torch

    from .files import atomic_path
    from .forecast import ForecastConfig, NoiseScheme, forecast_variances
    from .models import ModelSpec, resolve_device
    from .protect import (
        Level,
        compressed_tensors_config,
        gguf_tensor_types,
        llmcompressor_recipe,
        module_shapes,
        plan_for_watchlist,
        plan_table,
    )
    from .saes import check_compatible, sae_input
    from .survival import SurvivalConfig
    from .watchlist import WatchlistConfig, watchlist_features

    spec = section(ModelSpec, model)
    cfg = section(ForecastConfig, forecast)
    watch_cfg = section(WatchlistConfig, watchlist)
    thresholds = section(SurvivalConfig, analysis)
    device = resolve_device(str(encode.get("device", "auto")))
    watch = watchlist_features(read_parquet(fp_stats), watch_cfg, thresholds.active_rate)
    levels = [Level.from_entry(lv) for lv in entry["levels"]]
    schemes = [NoiseScheme(name=lv.name, weights=lv.spec) for lv in levels if lv.spec is not None]
    net = _forecast_model(spec, base, device)
    name, sae = _one_sae(saes, sae_path, device, "protect")
    check_compatible(net, sae)
    ids = torch.as_tensor(load_token_ids(tokens)[: cfg.n_sequences], dtype=torch.long)
    result = forecast_variances(
        net, sae, sae_input(sae, name, bos), ids, schemes,
        n_samples=cfg.n_samples, seed=cfg.seed, batch_size=cfg.batch_size, device=device,
    )  # fmt: skip
    shapes = module_shapes(net)
    r_min = entry.get("survived_r")
    plan, record = plan_for_watchlist(
        result, shapes, levels, watch,
        survived_r=thresholds.survived if r_min is None else float(r_min),
        budget=entry["budget"],
    )  # fmt: skip
    record["watchlist"] = {"ids": watch, "source": watch_cfg.source}
    with atomic_path(Path(out), directory=True) as tmp:
        write_json(tmp / "plan.json", plan.to_dict())
        write_json(tmp / "protect.json", record)
        write_parquet(plan_table(plan, shapes), tmp / "plan.parquet")
        write_json(tmp / "quantization_config.json", compressed_tensors_config(plan))
        (tmp / "recipe.yaml").write_text(llmcompressor_recipe(plan))
        try:
            lines = gguf_tensor_types(plan, net)
        except ValueError as e:  # a width with no GGUF type, or a family llama.cpp lacks
            log.warning("no GGUF tensor types for this plan: %s", e)
            lines = [f"# no GGUF tensor types for this plan: {e}"]
        (tmp / "tensor_types.txt").write_text("\n".join(lines) + "\n")
    log.info("watchlist: %s, %d features", watch_cfg.source, len(watch))
    return {
        **{k: v for k, v in record.items() if k not in ("watchlist", "shapes")},
        "protected": {
            m: levels[c].name for m, c in zip(plan.modules, plan.choice, strict=True) if c != 0
        },
    }


@stage
def protect_outcome(
    *,
    plans: Mapping[str, str],
    checkpoints: Mapping[str, str],
    features: str | Path,
    out: str | Path,
) -> pl.DataFrame:
    """Each protected variant's predicted against achieved watchlist survival and size
    (`protect.outcome_table`): `plans` and `checkpoints` map each protect- variant to its
    protect directory and its built checkpoint."""
    from .protect import outcome_table

    table = outcome_table(
        {v: read_json(Path(p) / "plan.json", "protect") for v, p in plans.items()},
        {v: read_json(Path(p) / "protect.json", "protect") for v, p in plans.items()},
        {v: Path(c) for v, c in checkpoints.items()},
        read_parquet(features),
    )
    write_parquet(table, out)
    return table


@stage
def gate(
    *,
    configfile: str | None = None,
    results: str | Path | None = None,
    bases: list[list[str]] | None = None,
    policy: str | Path | None = None,
    base_dirs: Mapping[str, str] | None = None,
    sae_dirs: Mapping[str, str] | None = None,
    watchlist: WatchlistConfig | Mapping[str, Any] | None = None,
    analysis: SurvivalConfig | Mapping[str, Any] | None = None,
    report: str | None = None,
    causal: bool | None = None,
    enforce: bool = True,
    out: str | Path | None = None,
    table_out: str | Path | None = None,
) -> dict[str, Any]:
    """The release gate (`gate.run_gate`): every variant of every (model, SAE) basis checked
    against the `policy` file from the tables under `results`; a JSON certificate per
    variant and junit.xml written under `out` (default <results>/certificates), the checks
    as one table to `table_out` (default <results>/tables/gate.parquet). With `enforce` (the default, as
    CI runs it) a violation by a release candidate exits 1 after everything is written.

    After a finished run, `--configfile` (the workflow's config) stands for everything
    else: its results directory, every basis, base model and SAE, watchlist, thresholds and
    gate section, with the certificates in <results>/certificates; a flag given as well
    overrides it. The workflow's own gate job passes every flag and `--enforce false`.
    """
    from . import config as audit_config
    from .gate import PolicyViolation, run_gate
    from .survival import SurvivalConfig
    from .watchlist import WatchlistConfig, watchlist_features

    if configfile is not None:
        cfg = audit_config.load(configfile)
        models = audit_config.model_names(cfg)
        results = results or cfg["results"]
        bases = bases or [[m, s] for m in models for s in audit_config.sae_names(cfg, m)]
        policy = policy or audit_config.gate_policy(cfg)
        base_dirs = base_dirs or {m: audit_config.base_model_source(cfg, m) for m in models}
        sae_dirs = sae_dirs or {
            f"{m}/{s}": d for m in models for s, d in audit_config.sae_sources(cfg, m).items()
        }
        watchlist = watchlist or cfg["watchlist"]
        analysis = analysis or cfg["analysis"]
        report = report or cfg["gate"]["report"]
        causal = cfg["causal"]["enabled"] if causal is None else causal
    missing = [
        flag
        for flag, value in (("--results", results), ("--bases", bases), ("--policy", policy))
        if value is None
    ]
    if missing or base_dirs is None:
        raise InputError(
            f"gate: give --configfile (the workflow's config) or all of --results, --bases, "
            f"--policy and --base-dirs; missing {missing or ['--base-dirs']}"
        )
    assert results is not None and bases is not None and policy is not None
    results = Path(results)
    out = Path(out) if out is not None else results / "certificates"
    watch_cfg = WatchlistConfig() if watchlist is None else section(WatchlistConfig, watchlist)
    active_rate = (
        SurvivalConfig() if analysis is None else section(SurvivalConfig, analysis)
    ).active_rate
    watchlists = {
        (m, s): watchlist_features(
            read_parquet(results / "features" / m / s / "fp_stats.parquet"), watch_cfg, active_rate
        )
        for m, s in bases
    }
    failed = run_gate(
        results,
        [(m, s) for m, s in bases],
        Path(policy),
        out,
        base_dirs={m: Path(d) for m, d in base_dirs.items()},
        sae_dirs={
            (k.split("/", 1)[0], k.split("/", 1)[1]): Path(d) for k, d in (sae_dirs or {}).items()
        },
        watchlists=watchlists,
        watchlist_sources={(m, s): watch_cfg.source for m, s in bases},
        report_path=report or "report.html",
        table_out=Path(table_out) if table_out is not None else results / "tables" / "gate.parquet",
        causal=True if causal is None else causal,
    )
    if failed and enforce:
        raise PolicyViolation(failed)
    return {"certificates": str(out), "failed": failed}
