"""Shared fixtures: tiny real transformers models and sae-lens SAEs, built and saved locally."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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
