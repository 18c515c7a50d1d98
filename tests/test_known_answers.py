"""Known-answer tests for the auditor (issue 11, section 3): plant damage of a known shape
and require the audit to find exactly it.

Everything is real: a tiny GPT-NeoX saved with save_pretrained, a sae-lens SAE saved in
its format, checkpoints made by the `compress` stage, token shards encoded by the
`encode` stage, and the `fp_stats`, `correlate`, `perplexity` and `survival` stages on
their outputs, as the workflow runs them (tests/test_stages.py calls them the same way).

The SAE reads `blocks.1.hook_mlp_out`, whose one writer is block 1's MLP output matrix
`mlp.dense_4h_to_h` (weight and bias): an edit of that matrix is an edit of exactly what
the SAE encodes. Its dictionary is a sae-lens synthetic feature world's ground truth
(`sae_lens.synthetic.FeatureDictionary`, orthogonalized unit vectors, put into the SAE
by `init_sae_to_match_feature_dict`: W_dec = the feature vectors, W_enc = W_dec^T) with
zero biases, so a feature's pre-activation is the hook activation's component along its
own direction. The synthetic world's activation generator is not used: the audit encodes
what a causal LM computes on token shards through a module hook, and the generator yields
activation vectors with no model or tokens behind them.

The planted edits are saved as model copies, each run through a checkpoint whose manifest
says "run this base model as is" (the fp-null kind) under the planted variant's own name,
so encode, correlate and survival see them like any variant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch

from sae_audit import stages
from sae_audit.models import load_model
from sae_audit.shards import write_token_shard

from .conftest import save_tiny_model

HIDDEN, D_SAE, LAYERS = 64, 96, 2
HOOK = "blocks.1.hook_mlp_out"
SEQ_LEN, N_SEQ, N_SHARDS = 32, 16, 2
MODEL = {"source": "x", "dtype": "float32", "revision": None, "attn_implementation": None}
ENCODE = {"batch_size": 8, "device": "cpu"}
ANALYSIS = {"active_rate": 0.001, "survived": 0.9, "destroyed": 0.5}
SCALE = 3.0  # (b): every activation at the hook times this constant
PLANTED = ("ext-rank1", "ext-scale")  # names of the planted variants


def _sae(path: Path) -> torch.Tensor:
    """Save the ground-truth SAE; return its feature directions [d_sae, d_in] (unit rows)."""
    import sae_lens
    from sae_lens.synthetic import FeatureDictionary, init_sae_to_match_feature_dict

    cfg = sae_lens.StandardSAEConfig(d_in=HIDDEN, d_sae=D_SAE)
    cfg.metadata.hook_name = HOOK
    sae = sae_lens.StandardSAE(cfg)
    world = FeatureDictionary(D_SAE, HIDDEN, seed=0)
    init_sae_to_match_feature_dict(sae, world)
    with torch.no_grad():
        sae.W_dec.data = sae.W_dec.data.contiguous()  # it sets a transposed clone
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.save_model(path)
    return world.feature_vectors.detach().clone()


def _edit_mlp_out(base: Path, out: Path, edit) -> Path:
    """A copy of the model with block 1's MLP output (weight [out, in] and bias) edited."""
    model: Any = load_model(base)
    mlp = model.gpt_neox.layers[1].mlp
    with torch.no_grad():
        mlp.dense_4h_to_h.weight.copy_(edit(mlp.dense_4h_to_h.weight))
        mlp.dense_4h_to_h.bias.copy_(edit(mlp.dense_4h_to_h.bias[:, None])[:, 0])
    model.save_pretrained(out)
    return out


def _planted_checkpoint(model_dir: Path, name: str, out: Path) -> None:
    stages.compress(model=MODEL, base=str(model_dir), variant="fp-null", out=out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "variant": name}))


@pytest.fixture(scope="module")
def audit(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("known")
    base = save_tiny_model("gpt_neox", root / "model", hidden=HIDDEN, layers=LAYERS)
    directions = _sae(root / "sae")
    ids = torch.randint(4, 64, (N_SEQ, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    per = N_SEQ // N_SHARDS
    tokens = [root / f"tokens/shard-{i:03d}.parquet" for i in range(N_SHARDS)]
    for i, path in enumerate(tokens):
        write_token_shard(path, ids[i * per : (i + 1) * per].numpy(), i * per, {"seq_len": SEQ_LEN})

    # (a) project one feature's direction out of the hook's writer: a rank-1 edit
    target = 7
    d = directions[target][:, None]
    rank1 = _edit_mlp_out(base, root / "rank1", lambda w: w - d @ (d.T @ w))
    # (b) scale the hook's writer: every activation at the hook times SCALE
    scaled = _edit_mlp_out(base, root / "scale", lambda w: SCALE * w)

    checkpoints = root / "checkpoints"
    for variant in ("fp", "fp-null", "fp-noise"):
        stages.compress(model=MODEL, base=str(base), variant=variant, out=checkpoints / variant)
    for name, edited in zip(PLANTED, (rank1, scaled), strict=True):
        _planted_checkpoint(edited, name, checkpoints / name)
    variants = ("fp", "fp-null", "fp-noise", *PLANTED)
    codes: dict[str, list[str]] = {}
    nll: dict[str, list[str]] = {}
    for v in variants:
        codes[v], nll[v] = [], []
        for i, shard in enumerate(tokens):
            out = root / f"codes/{v}/shard-{i:03d}"
            nll[v].append(str(root / f"nll/{v}/shard-{i:03d}.parquet"))
            stages.encode(model=MODEL, saes={"res": {"path": str(root / "sae")}}, encode=ENCODE,
                          checkpoint=checkpoints / v, tokens=shard, codes_dir=out, nll=nll[v][-1],
                          model_name="tiny")  # fmt: skip
            codes[v].append(str(out / "res.parquet"))
    tables = root / "tables"
    stages.fp_stats(codes=codes["fp"], out=tables / "fp_stats.parquet")
    for v in variants[1:]:
        stages.correlate(fp=codes["fp"], variant=codes[v], variant_name=v,
                         out=tables / f"{v}.parquet")  # fmt: skip
    stages.perplexity(nll=nll, out=tables / "perplexity.parquet")
    summary = stages.survival(
        analysis=ANALYSIS,
        fp_stats=tables / "fp_stats.parquet",
        correlation={v: str(tables / f"{v}.parquet") for v in variants[1:]},
        perplexity=tables / "perplexity.parquet",
        features_out=tables / "features.parquet",
        summary_out=tables / "survival.parquet",
    )
    features = pl.read_parquet(tables / "features.parquet").filter(pl.col("active"))
    return {
        "target": target,
        "features": {str(k[0]): t.sort("feature") for k, t in features.group_by("variant")},
        "summary": {r["variant"]: r for r in summary.to_dicts()},
        "directions": directions,
        "root": root,
    }


def test_the_world_is_what_the_tests_assume(audit) -> None:
    """Every feature is active and the SAE's decoder is the world's ground truth."""
    from sae_audit.saes import load_sae

    assert audit["features"]["fp-null"].height == D_SAE  # zero biases: each fires on ~half
    assert audit["summary"]["fp-null"]["n_active"] == D_SAE
    sae = load_sae({"path": str(audit["root"] / "sae")})  # what encode loaded
    directions = audit["directions"]
    assert torch.equal(sae.W_dec, directions) and torch.equal(sae.W_enc, directions.T)
    assert torch.allclose(directions.norm(dim=1), torch.ones(D_SAE), atol=1e-5)


def test_a_removed_feature_direction_destroys_that_feature_and_few_others(audit) -> None:
    rank1 = audit["features"]["ext-rank1"]
    target = audit["target"]
    row = rank1.filter(pl.col("feature") == target).to_dicts()[0]
    assert row["class"] == "destroyed" and row["r"] < 0.5
    others = rank1.filter(pl.col("feature") != target)
    destroyed = others.filter(pl.col("class") == "destroyed").height
    assert destroyed <= 0.05 * others.height, f"{destroyed} other features destroyed"
    # the dictionary is near-orthogonal, not orthogonal (96 features in 64 dimensions):
    # a neighbour may blur a little, but nearly all others keep r > 0.9
    assert (others["r"] > ANALYSIS["survived"]).mean() >= 0.9
    # and it stands out of the noise floor by far: damage far above the noise null's worst
    noise = audit["features"]["fp-noise"]["damage"].max()
    assert row["damage"] > 10 * noise


def test_a_constant_scale_leaves_every_feature_survived_with_r_one(audit) -> None:
    scaled = audit["features"]["ext-scale"]
    assert (scaled["class"] == "survived").all()
    assert scaled["r"].min() > 1 - 1e-6  # Pearson is scale-free: only float rounding left
    assert audit["summary"]["ext-scale"]["survived_pct"] == 100.0


def test_fp_weights_land_inside_the_noise_null(audit) -> None:
    null, noise = audit["features"]["fp-null"], audit["features"]["fp-noise"]
    assert null["feature"].to_list() == noise["feature"].to_list()
    damage_null, damage_noise = null["damage"].to_numpy(), noise["damage"].to_numpy()
    assert np.all(damage_null <= damage_noise)  # feature by feature
    assert damage_null.max() <= 1e-12  # the identical computation: r = 1
    assert damage_noise.max() > 0  # the other dtype is another numeric path
    # bfloat16 moves r, but a numeric path alone destroys nothing here: it is the floor
    assert audit["summary"]["fp-noise"]["survived_pct"] == 100.0
    # the constant scale is as harmless as the noise floor says
    scale = audit["features"]["ext-scale"]["damage"].to_numpy()
    assert scale.max() <= damage_noise.max()
