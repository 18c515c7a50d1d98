"""Shared fixtures: tiny real transformers models and sae-lens SAEs, built and saved locally."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml


@pytest.fixture
def gpt_neox_dir(tmp_path: Path) -> Path:
    return save_tiny_model("gpt_neox", tmp_path / "model")


ROOT = Path(__file__).resolve().parents[1]
TEST_CONFIG = ROOT / "tests" / "configs" / "test.yaml"


def snakemake(
    workdir: Path,
    config: Path,
    *args: str,
    check: bool = True,
    timeout: float = 1200,
    cores: str | None = "2",
) -> subprocess.CompletedProcess:
    """Run the real Snakefile with the snakemake CLI in `workdir`; on failure show the job logs."""
    cmd = [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(ROOT / "Snakefile"),
        "--directory", str(workdir),
        "--configfile", str(config),
        *(["--cores", cores] if cores else []),
        *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        logs = (
            "\n".join(
                f"--- {p}\n{p.read_text()[-3000:]}"
                for p in sorted((workdir / "results" / "logs").rglob("*.log"))
            )
            if (workdir / "results" / "logs").exists()
            else ""
        )
        raise AssertionError(
            f"snakemake failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}\n{logs}"
        )
    return proc


def planned_jobs(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """Job counts per rule from a dry-run's 'Job stats' table."""
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return {}
    table = (
        text.split("Job stats:")[1].split("Reasons:")[0]
        if "Reasons:" in text
        else text.split("Job stats:")[1]
    )
    jobs = {}
    for line in table.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m and m[1] != "total":
            jobs[m[1]] = int(m[2])
    return jobs


def edited_config(tmp: Path, name: str, edit) -> Path:
    cfg = yaml.safe_load(TEST_CONFIG.read_text())
    edit(cfg)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# The SLURM tests need a running single-node cluster (tests/slurm/cluster.sh start, which
# as root installs slurm-wlm and munge with apt and starts daemons): a plain `pytest` must
# not touch the system, so they run only when the caller says the cluster is up.
SLURM_OPT_IN = "SAE_AUDIT_SLURM_TESTS"


def pytest_collection_modifyitems(config, items):
    if os.environ.get(SLURM_OPT_IN) == "1":
        return
    skip = pytest.mark.skip(
        reason=f"SLURM tests are opt-in: start the cluster (sudo bash tests/slurm/cluster.sh "
        f"start), then run with {SLURM_OPT_IN}=1 (.ci/run does both)"
    )
    for item in items:
        if "slurm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """The test config run once, end to end, shared by the workflow and SLURM tests."""
    workdir = tmp_path_factory.mktemp("workflow")
    snakemake(workdir, TEST_CONFIG)
    return workdir


# ---------------------------------------------------------------- tiny models of every family
TINY_SPECIALS = ("<bos>", "<eos>", "<unk>", "<pad>")
TINY_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,;:!?'\"-()\n"


def tiny_tokenizer(vocab_size: int = 64):
    """A character-level WordLevel tokenizer with <bos>/<eos>/<unk>/<pad> (ids 0..3).

    Lower-case letters, digits, space and punctuation get ids of their own (as many as
    fit in `vocab_size`); any other character is <unk>, so it tokenizes any text.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < len(TINY_SPECIALS) + 1:
        raise ValueError(f"vocab_size must be at least {len(TINY_SPECIALS) + 1}")
    symbols = list(TINY_SPECIALS) + list(TINY_ALPHABET)
    symbols += [f"<extra_{i}>" for i in range(max(0, vocab_size - len(symbols)))]
    vocab = {s: i for i, s in enumerate(symbols[:vocab_size])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=1_000_000,
        clean_up_tokenization_spaces=False,
    )


TINY_FAMILIES = ("gpt_neox", "gemma2", "llama", "gpt2")


def tiny_config(family: str, vocab_size: int = 64, hidden: int = 32, layers: int = 3):
    """A transformers config of `family` (a model_type) with tiny dimensions; 4 heads."""
    from transformers import Gemma2Config, GPT2Config, GPTNeoXConfig, LlamaConfig

    special = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 3}
    heads = 4
    if family == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            max_position_embeddings=128,
            tie_word_embeddings=False,  # Pythia: a separate embed_out
            **special,
        )
    if family == "gemma2":
        return Gemma2Config(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=2,
            head_dim=hidden // heads,
            query_pre_attn_scalar=hidden // heads,
            intermediate_size=2 * hidden,
            max_position_embeddings=128,
            sliding_window=4,  # shorter than test sequences, so the local layers differ
            tie_word_embeddings=True,  # as Gemma-2 is
            **special,
        )
    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=2,
            intermediate_size=2 * hidden,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            **special,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_positions=128,
            **special,
        )
    raise ValueError(f"no tiny config for family {family!r}: choose from {TINY_FAMILIES}")


def save_tiny_model(
    family: str,
    path: Path,
    vocab_size: int = 64,
    hidden: int = 32,
    layers: int = 3,
    seed: int = 0,
) -> Path:
    """Save a random-weight causal LM of `family` plus a matching tokenizer into `path`.

    `family` is a model_type: "gpt_neox", "gemma2", "llama" or "gpt2". The directory
    loads with sae_audit.models.load_model / load_tokenizer like a hub checkpoint.
    """
    from transformers import AutoModelForCausalLM

    from sae_audit.fixture.tokenizer import save_tokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size, hidden, layers))
    path = Path(path)
    model.eval().save_pretrained(path)
    save_tokenizer(tiny_tokenizer(vocab_size), path)
    return path


# ---------------------------------------------------------------- codes written as real shards
def write_dense(
    root: Path,
    variant: str,
    dense: np.ndarray,
    n_shards: int,
    row_group_size: int = 1 << 20,
    rows_per_write: int = 17,
    d_sae: int | None = None,
    excluded: Sequence[int] = (),
) -> list[Path]:
    """Write a dense [n_tokens, d_sae] code matrix as sparse shards split by token.

    Positions in `excluded` get no rows and are recorded as excluded, as encode does
    with encode.exclude_special_positions.
    """
    from sae_audit.shards import CodeShardWriter, ShardMetadata

    dense = dense.copy()
    dense[list(excluded)] = 0
    n_tokens, d = dense.shape
    bounds = np.linspace(0, n_tokens, n_shards + 1).astype(int)
    paths = []
    for i, (start, stop) in enumerate(itertools.pairwise(bounds)):
        meta = ShardMetadata(
            model="m",
            variant=variant,
            sae="s",
            hook="h",
            d_sae=d_sae or d,
            token_start=int(start),
            token_stop=int(stop),
            config_hash="x",
            excluded=tuple(int(t) for t in sorted(excluded) if start <= t < stop),
        )
        path = root / variant / f"shard-{i}.parquet"
        with CodeShardWriter(path, meta, row_group_size=row_group_size) as w:
            for t0 in range(start, stop, rows_per_write):
                block = dense[t0 : min(t0 + rows_per_write, stop)]
                tok, feat = np.nonzero(block)
                w.write(tok + t0, feat.astype(np.int32), block[tok, feat].astype(np.float32))
        paths.append(path)
    return paths


def sparse_random(rng: np.random.Generator, n: int, d: int, density: float) -> np.ndarray:
    x = rng.exponential(1.0, size=(n, d)) * (rng.random((n, d)) < density)
    return x.astype(np.float32).astype(np.float64)


# ---------------------------------------------------------------- the fixture, small, once per session
# Shared by tests/test_fixture_*.py: corpus -> tokenizer -> model, each built once.
# Imports stay inside the fixtures so that collecting the suite does not pay for them.
@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    from sae_audit.fixture.corpus import build_corpus

    from .test_fixture_corpus import SMALL_CORPUS

    root = tmp_path_factory.mktemp("corpus")
    stats = build_corpus(SMALL_CORPUS, root / "train.txt", root / "heldout.txt")
    return root / "train.txt", root / "heldout.txt", stats


@pytest.fixture(scope="session")
def tokenizer_dir(
    corpus: tuple[Path, Path, dict], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    from sae_audit.fixture.tokenizer import TokenizerConfig, train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(TokenizerConfig(vocab_size=512), corpus[0], out)
    return out


@pytest.fixture(scope="session")
def model_dir(
    corpus: tuple[Path, Path, dict], tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    from sae_audit.fixture.model import train_model

    from .test_fixture_model import TINY_MODEL

    out = tmp_path_factory.mktemp("model")
    train_model(TINY_MODEL, tokenizer_dir, corpus[0], corpus[1], out)
    return out
