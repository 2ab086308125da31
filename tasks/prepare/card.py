"""The dataset card ``DIR/README.md`` of a prepared folder: what ``datasets.load_dataset(DIR, "pairs")`` reads.

Its YAML header declares one ``datasets`` config per data folder (``corpus``, ``pairs``, ``masked``,
``token_counts``), each a ``train`` split over ``<folder>/*.parquet``; the text states the schema, the
tokenizer, the seeds and options, and the counts, from the stage manifests. Written (atomically) after
every stage, from the stages finished so far, with no timings, paths of the output folder or dates, so
the same input and options give the same bytes.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from distilflow.tasks.core.io import exists, join, write_bytes
from distilflow.tasks.core.stage import META, manifest_url, read_manifest

# config name -> (folder, what one row is)
CONFIGS = {
    "pairs": ("pairs", "one BERT input `[CLS] A [SEP] B [SEP]` (or `[CLS] S [SEP]` with `--no-nsp`), unmasked"),
    "masked": ("masked", "a pair with static MLM masks; `dupe_factor` differently masked copies of every pair"),
    "corpus": ("corpus", "one document, split into sentences"),
    "token_counts": ("token_counts", "how often a token id occurs in `pairs` (for frequency-smoothed masking)"),
}
STAGE_OF = {"corpus": "corpus", "pairs": "pairs", "masked": "masked", "token_counts": "pairs"}


def _schema_text(schema: pa.Schema) -> str:
    return ", ".join(f"`{f.name}` {f.type}" for f in schema)


def _schemas() -> dict[str, pa.Schema]:
    from distilflow.tasks.prepare.mask import MASKED_SCHEMA
    from distilflow.tasks.prepare.pairs import COUNTS_SCHEMA, PAIRS_SCHEMA
    from distilflow.tasks.prepare.shard import CORPUS_SCHEMA

    return {"corpus": CORPUS_SCHEMA, "pairs": PAIRS_SCHEMA, "masked": MASKED_SCHEMA, "token_counts": COUNTS_SCHEMA}


def render_card(manifests: dict[str, dict[str, Any]]) -> str:
    """The card for the finished stages in ``manifests`` (stage name -> manifest)."""
    names = [n for n in CONFIGS if STAGE_OF[n] in manifests]
    yaml = ["---", "configs:"]
    for i, name in enumerate(names):
        yaml += [f"- config_name: {name}", *(["  default: true"] if i == 0 else []), "  data_files:",
                 "  - split: train", f"    path: {CONFIGS[name][0]}/*.parquet"]
    yaml += ["tags:", "- distilflow", "- bert-pretraining", "---", ""]
    schemas = _schemas()
    rows = []
    for name in names:
        m = manifests[STAGE_OF[name]]
        if name == "token_counts":
            rows.append(f"| `{name}` | `token_counts/` | {m.get('vocab_size', '')} ids | | 1 | {CONFIGS[name][1]} |")
            continue
        tokens = f"{m['tokens']:,}" if name != "corpus" else f"{m['counts'].get('sentences', 0):,} sentences"
        rows.append(f"| `{name}` | `{CONFIGS[name][0]}/` | {m['rows']:,} | {tokens} | {len(m['files'])} | {CONFIGS[name][1]} |")
    body = [
        "# Prepared BERT pretraining data (distilflow)",
        "",
        "Written by `distilflow prepare`: input text -> sentence-split documents (`corpus`) -> tokenized NSP pairs "
        "(`pairs`) -> static MLM masks (`masked`). Every data folder holds only Parquet files of one schema, so "
        "any Parquet reader opens it:",
        "",
        "```python",
        "from datasets import load_dataset",
        f'ds = load_dataset("DIR", "{names[0] if names else "pairs"}", split="train")   # DIR = this folder',
        "import pyarrow.dataset as pds; pds.dataset(\"DIR/pairs\").to_table()",
        "import duckdb; duckdb.sql(\"SELECT count(*) FROM 'DIR/pairs/*.parquet'\")",
        "```",
        "",
        "| config | folder | rows | tokens | files | one row is |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        "## Schema",
        "",
        *(f"- `{n}`: {_schema_text(schemas[n])}" for n in names),
        "",
        "`next_sentence_label`: 0 = B follows A, 1 = B from another document, -100 = no NSP (`--no-nsp`). "
        "`labels`: the original token id where a token was selected for prediction, -100 elsewhere. "
        "`token_type_ids`: 0 up to and including the first `[SEP]`, 1 after it.",
        "",
        "## How it was made",
        "",
        *_provenance(manifests),
        "",
        "## Bookkeeping",
        "",
        f"Each data folder keeps its run records in a hidden `{META}/` folder, which Parquet readers and "
        "`datasets` skip: `config.json` (the stage's options; a rerun with other options is refused), "
        "`manifest.json` (files, rows, tokens, counts, skipped records by reason), `done/` (one completion "
        "marker per unit of work: a rerun skips finished units) and `errors/` (quarantined bad input records "
        "with file, line, reason and fix). The tokenizer used is in `tokenizer/` "
        "(`AutoTokenizer.from_pretrained(\"DIR/tokenizer\")`).",
        "",
    ]
    return "\n".join(yaml + body)


def _provenance(manifests: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    if "corpus" in manifests:
        c = manifests["corpus"]
        cfg = c["config"]
        inputs = cfg.get("inputs", [])
        out.append(f"- **corpus**: {len(inputs)} input file(s), {c['counts'].get('input_bytes', 0):,} bytes; format "
                   f"`{cfg.get('format')}`, one sentence per line: {cfg.get('one_sentence_per_line')}; "
                   f"{c['rows']:,} documents, {c['counts'].get('sentences', 0):,} sentences; skipped: "
                   f"{c['skipped'] or 'none'}")
    if "pairs" in manifests:
        p = manifests["pairs"]
        cfg = p["config"]
        out.append(f"- **tokenizer**: `tokenizer/`, vocabulary {p.get('vocab_size', '?'):,}, content hash "
                   f"`{cfg.get('tokenizer_sha256')}`")
        out.append(f"- **pairs**: seed {cfg.get('seed')}, max_seq_len {cfg.get('max_seq_len')}, short_seq_prob "
                   f"{cfg.get('short_seq_prob')}, NSP: {cfg.get('nsp')}, BERT-exact NSP: "
                   f"{not cfg.get('balance_single_sentence', True)}, algorithm version "
                   f"{cfg.get('algorithm_version')}; counts: {_counts(p['counts'])}")
    if "masked" in manifests:
        m = manifests["masked"]
        cfg = m["config"]
        out.append(f"- **masked**: seed {cfg.get('seed')}, mlm_prob {cfg.get('mlm_prob')}, whole-word: "
                   f"{cfg.get('whole_word')}, smoothing {cfg.get('smoothing')}, max_predictions "
                   f"{cfg.get('max_predictions')}, dupe_factor {cfg.get('dupe_factor')}; counts: {_counts(m['counts'])}")
    return out


def _counts(counts: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in counts.items())


def write_dataset_card(output: str) -> str:
    """(Re)write ``output/README.md`` from the manifests of the finished stages; returns its URL."""
    manifests = {s: read_manifest(join(output, s)) for s in ("corpus", "pairs", "masked")
                 if exists(manifest_url(join(output, s)))}
    url = join(output, "README.md")
    write_bytes(url, render_card(manifests).encode())
    return url
