"""The evaluation token set: contiguous fixed-length sequences written as Parquet shards.

Two steps, each one function:

- `load_documents(spec, paths)`: the documents of a token source (config
  `models.<name>.tokens`), from a small registry keyed by `tokens.source`:
  `fixture` and `text` (local text files), `jsonl`, `parquet` (local files, one
  document per row in `text_column`), `hf` (`datasets.load_dataset`).
- `build_token_set(documents, tokenizer, cfg, out_paths)`: join the documents
  with `tokens.join`, tokenize that stream once, cut `n_sequences` contiguous
  chunks of `seq_len` tokens (after an optional BOS), and write them as shards.

`load_tokenizer(source)` loads the HF tokenizer; it lives here, not in
`sae_audit.models`, so that table stages get one without importing torch.

The reference study (WikiText-2 raw train: the dataset's non-empty rows joined
with blank lines, each row raw, its leading space and trailing newline kept; no
special tokens; 512-token chunks) is::

    tokens: {source: hf, dataset: {path: wikitext, name: wikitext-2-raw-v1, split: train},
             text_column: text, line_documents: false, strip: false, drop_empty: true,
             join: "\\n\\n", add_special_tokens: false, bos: false, seq_len: 512,
             n_sequences: 390}

`strip` defaults to true, which changes the text (and so the token ids) of WikiText
rows: the reference recipe must turn it off (config/paper.yaml does).
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import FROM_SCHEMA, ConfigSection, check_token_set, section_label
from .shards import read_token_shard, write_token_shard


# ---------------------------------------------------------------- documents
@dataclass(frozen=True)
class DocumentSpec(ConfigSection, section="models.*.tokens"):
    """The document-reading keys of `models.<name>.tokens` (TokenSetConfig has the rest)."""

    source: str  # required by the schema: no default
    text_column: str = FROM_SCHEMA
    drop_empty: bool = FROM_SCHEMA  # drop empty / whitespace-only documents
    line_documents: bool = FROM_SCHEMA  # every line is a document (text files: not paragraphs)
    strip: bool = FROM_SCHEMA  # strip leading/trailing whitespace of every document
    # source hf: load_dataset arguments. The schema has no default (other sources have no
    # dataset), so empty stands for absent; _read_hf names the missing path.
    dataset: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Source:
    read: Callable[[DocumentSpec, list[str]], Iterator[str]]  # raw items, in order
    local: bool  # reads the given local paths (else: paths must be empty)
    unit: str  # how a raw item splits into documents unless line_documents: paragraphs | item


def _read_text(spec: DocumentSpec, paths: list[str]) -> Iterator[str]:
    for path in paths:
        # text mode reads universal newlines: "\r\n" and "\r" arrive as "\n"
        yield Path(path).read_text(encoding="utf-8")


def _row_text(value: Any, spec: DocumentSpec, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(
            f"tokens.text_column={spec.text_column!r}: {where} holds a "
            f"{type(value).__name__}, not a string"
        )
    return value


def _missing_column(spec: DocumentSpec, where: str, available: list[str]) -> ValueError:
    return ValueError(
        f"tokens.text_column={spec.text_column!r} is not a column of {where}; "
        f"available columns: {available}"
    )


def _read_jsonl(spec: DocumentSpec, paths: list[str]) -> Iterator[str]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"tokens.paths: {where} is not valid JSON: {e}") from e
                if not isinstance(row, dict):
                    raise ValueError(
                        f"tokens.paths: {where} is a JSON {type(row).__name__}, "
                        "expected an object with a tokens.text_column key"
                    )
                if spec.text_column not in row:
                    raise _missing_column(spec, where, sorted(row))
                yield _row_text(row[spec.text_column], spec, where)


def _read_parquet(spec: DocumentSpec, paths: list[str]) -> Iterator[str]:
    import pyarrow.parquet as pq

    for path in paths:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if spec.text_column not in names:
            raise _missing_column(spec, str(path), names)
        for batch in pf.iter_batches(columns=[spec.text_column]):
            for value in batch.column(0).to_pylist():
                yield _row_text(value, spec, str(path))


def _read_hf(spec: DocumentSpec, paths: list[str]) -> Iterator[str]:
    """`datasets.load_dataset(path, name, split=..., revision=...)`: a hub id or a local directory.

    Offline runs (HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1) read the HF cache,
    which `sae-audit prefetch` fills.
    """
    from datasets import load_dataset

    ds_spec = spec.dataset
    if not ds_spec.get("path"):
        raise ValueError("tokens.dataset.path is required for tokens.source='hf'")
    split = ds_spec.get("split") or "train"
    ds = load_dataset(
        ds_spec["path"], ds_spec.get("name"), split=split, revision=ds_spec.get("revision")
    )
    where = f"dataset {ds_spec['path']!r} (name={ds_spec.get('name')!r}, split={split!r})"
    if spec.text_column not in ds.column_names:
        raise _missing_column(spec, where, list(ds.column_names))
    for value in ds[spec.text_column]:
        yield _row_text(value, spec, where)


SOURCES: dict[str, _Source] = {
    # the workflow passes the fixture's held-out text file as the one local path
    "fixture": _Source(_read_text, local=True, unit="paragraphs"),
    "text": _Source(_read_text, local=True, unit="paragraphs"),
    "jsonl": _Source(_read_jsonl, local=True, unit="item"),
    "parquet": _Source(_read_parquet, local=True, unit="item"),
    "hf": _Source(_read_hf, local=False, unit="item"),
}


def _split(item: str, source: _Source, spec: DocumentSpec) -> list[str]:
    if spec.line_documents:
        return item.split("\n")
    if source.unit == "paragraphs":
        return item.split("\n\n")
    return [item]


def load_documents(spec: dict[str, Any], paths: list[str]) -> list[str]:
    """The documents of one token source, in order.

    `spec` is `models.<name>.tokens` (missing keys take the schema defaults);
    `paths` are the local input files (the workflow passes `tokens.paths`, or the
    fixture's held-out text for `source: fixture`; empty for `hf`).

    A raw item is a whole file (text sources) or one row (jsonl, parquet, hf).
    It becomes documents by splitting into blank-line separated paragraphs (text
    files) or not at all (rows), or, with `line_documents`, into lines; then
    each document is stripped (`strip`) and empty ones dropped (`drop_empty`).
    """
    doc_spec = DocumentSpec.from_dict(spec)
    source = SOURCES[doc_spec.source]
    paths = [str(p) for p in paths]
    if source.local and not paths:
        raise ValueError(
            f"tokens.paths: no input files for tokens.source={doc_spec.source!r}; "
            "list the local files under tokens.paths"
        )
    if not source.local and paths:
        raise ValueError(
            f"tokens.paths is not used by tokens.source={doc_spec.source!r} (got {paths}); "
            "name the dataset under tokens.dataset, or use a local source"
        )
    for path in paths if source.local else []:
        if not Path(path).is_file():
            raise FileNotFoundError(f"tokens.paths: {path} is not a file")
    docs: list[str] = []
    for item in source.read(doc_spec, paths):
        for doc in _split(item, source, doc_spec):
            if doc_spec.strip:
                doc = doc.strip()
            if doc_spec.drop_empty and not doc.strip():
                continue
            docs.append(doc)
    return docs


# ---------------------------------------------------------------- tokenizer
def load_tokenizer(source: str | Path, revision: str | None = None) -> Any:
    """The HF tokenizer of a model id or local directory.

    Torch-free (transformers imports without torch), so table stages such as
    damaged_contexts can decode tokens in an environment without torch.
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source), revision=revision)


# ---------------------------------------------------------------- token set
@dataclass(frozen=True)
class TokenSetConfig(ConfigSection, section="models.*.tokens"):
    """The token-set keys of `models.<name>.tokens` (DocumentSpec has the document keys)."""

    seq_len: int = FROM_SCHEMA
    n_sequences: int = FROM_SCHEMA
    n_shards: int = FROM_SCHEMA
    add_special_tokens: bool = FROM_SCHEMA
    bos: bool = FROM_SCHEMA  # prepend BOS to every sequence (seq_len includes it)
    join: str = FROM_SCHEMA  # inserted between documents

    def _check(self) -> None:
        check_token_set(self.to_dict(), section_label(self.section))


def shard_bounds(n_sequences: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) sequence ranges, as equal as possible."""
    edges = np.linspace(0, n_sequences, n_shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


# Tokenization at document boundaries. The reference study tokenized the joined
# text as ONE string, and a BPE tokenizer may merge across a boundary (the join
# "\n\n" and its neighbours), so tokenizing documents separately and splicing in
# the tokenized join would change ids there. We therefore always tokenize the
# joined string itself, but only a prefix of it: whole documents, enough for
# the tokens we keep plus a safety margin. Cutting the text changes at most the
# tokens of its last few pre-tokens (byte-level BPE splits words before
# merging; whole-string BPE merges locally), far inside the margin, so the
# kept ids equal those of the full joined string. When the prefix comes up
# short it grows (by the measured characters per token) up to the whole text.
_FIRST_CHARS_PER_TOKEN = 6  # first guess; English byte-level BPE is ~4
_MARGIN_TOKENS = 1024


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]


def tokenize_joined(
    documents: list[str], tokenizer: Any, join: str, add_special_tokens: bool, n_tokens: int
) -> tuple[list[int], bool]:
    """Ids of `join.join(documents)`, or of a prefix of it with at least `n_tokens` + margin.

    Returns (ids, complete): complete is True when the whole text was tokenized.
    """
    if not documents:
        return _encode(tokenizer, "", add_special_tokens), True
    target = n_tokens + max(_MARGIN_TOKENS, n_tokens // 100)
    # ends[i]: end offset of document i in the joined string
    ends = list(itertools.accumulate(len(d) + len(join) for d in documents))
    ends = [e - len(join) for e in ends]
    chars = target * _FIRST_CHARS_PER_TOKEN
    while True:
        k = min(bisect.bisect_left(ends, chars) + 1, len(documents))
        ids = _encode(tokenizer, join.join(documents[:k]), add_special_tokens)
        if k == len(documents):
            return ids, True
        if len(ids) >= target:
            return ids, False
        chars = int(ends[k - 1] * 1.2 * target / len(ids)) if ids else 2 * ends[k - 1]


def build_token_set(
    documents: list[str], tokenizer: Any, cfg: TokenSetConfig, out_paths: Sequence[str | Path]
) -> dict[str, Any]:
    """Tokenize documents joined by `cfg.join` into one stream, cut contiguous chunks, shard them."""
    if len(out_paths) != cfg.n_shards:
        raise ValueError(f"expected {cfg.n_shards} output paths, got {len(out_paths)}")
    bos = tokenizer.bos_token_id if cfg.bos else None
    if cfg.bos and bos is None:
        raise ValueError("tokens.bos is true but the tokenizer has no BOS token")
    body = cfg.seq_len - (1 if bos is not None else 0)
    needed = cfg.n_sequences * body
    ids, complete = tokenize_joined(documents, tokenizer, cfg.join, cfg.add_special_tokens, needed)
    if len(ids) < needed:
        raise ValueError(
            f"tokens.n_sequences={cfg.n_sequences} x seq_len={cfg.seq_len} needs "
            f"{needed} tokens but the text has {len(ids)}: lower tokens.n_sequences"
        )
    chunks = np.asarray(ids[:needed], dtype=np.int64).reshape(cfg.n_sequences, body)
    if bos is not None:
        chunks = np.concatenate(
            [np.full((cfg.n_sequences, 1), bos, dtype=np.int64), chunks], axis=1
        )
    meta = {"seq_len": cfg.seq_len, "n_sequences": cfg.n_sequences, "bos": bos}
    for (start, stop), path in zip(
        shard_bounds(cfg.n_sequences, cfg.n_shards), out_paths, strict=True
    ):
        write_token_shard(path, chunks[start:stop], start, meta)
    return {
        "n_tokens": int(chunks.size),
        "n_documents": len(documents),
        "n_text_tokens": len(ids),  # tokens of the tokenized text (a prefix unless complete)
        "text_complete": complete,
        **meta,
    }


def load_token_ids(paths: Sequence[str | Path]) -> np.ndarray:
    """All sequences of the given shards, in order, as [n_seq, seq_len]."""
    return np.concatenate([read_token_shard(p)[1] for p in paths], axis=0)


def check_disjoint(
    calibration: np.ndarray, evaluation: np.ndarray, window: int = 64, what: str = "calibration"
) -> None:
    """ValueError when any `window` consecutive calibration tokens also occur in the evaluation
    tokens: calibrating on evaluation text would flatter the compressed model.

    Both are read as one stream each (their sequences are consecutive chunks of one text).
    """
    from numpy.lib.stride_tricks import sliding_window_view

    def windows(ids: np.ndarray) -> set[bytes]:
        stream = np.ascontiguousarray(ids.reshape(-1), dtype=np.int64)
        if len(stream) < window:
            return set()
        return {w.tobytes() for w in sliding_window_view(stream, window)}

    shared = windows(calibration) & windows(evaluation)
    if shared:
        raise ValueError(
            f"{what}: {len(shared)} windows of {window} calibration tokens also occur in the "
            "evaluation token set; calibrate on other text (models.<name>.calibration)"
        )
