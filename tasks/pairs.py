"""Stage 2 -- pairs: ``corpus/part-*.parquet`` -> tokenized ``[CLS] A [SEP] B [SEP]`` in ``pairs/``.

BERT's ``create_instances_from_document`` (google-research/bert), re-implemented on token arrays:

* per document a target length: ``max_seq_len - 3`` tokens, or with probability ``short_seq_prob`` a
  random length in [2, max) so the model also sees short sequences;
* sentences are accumulated into a chunk until the target is reached; A = the first ``a_end`` sentences
  (random split point); with probability 1/2 (or always when the chunk has one sentence) B comes from a
  random *other* document, starting at a random sentence, and the chunk's unused sentences are put back;
  otherwise B = the rest of the chunk, i.e. the text that really follows A;
* deviation (``balance_single_sentence``, default on): BERT forces a random B for a one-sentence chunk,
  which on corpora of short documents (paragraphs of a novel) gives ~80% label 1; we instead split that
  sentence at a random token with probability 1/2 (B then really follows A), keeping labels ~50/50;
* ``truncate_seq_pair``: tokens are dropped one at a time from the longer segment, from the front or the
  back at random, until ``len(A) + len(B) <= max_seq_len - 3``.

``next_sentence_label``: 0 = B follows A, 1 = B from another document (HF ``BertForPreTraining``).
The random document comes from the same corpus part (bounded memory); a part holding a single document
borrows from the next part. ``--no-nsp`` writes DistilBERT/RoBERTa-style single contiguous segments
``[CLS] S [SEP]`` (sentences packed up to the length; label -100 = ignored).
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa

from distilflow.tasks.config import Config, require
from distilflow.tasks.io import join, read_parquet, release_memory, write_parquet
from distilflow.tasks.rng import derive_rng
from distilflow.tasks.stage import StageDir

NO_NSP_LABEL = -100

PAIRS_SCHEMA = pa.schema(
    [
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("token_type_ids", pa.list_(pa.int8()), nullable=False),
        pa.field("next_sentence_label", pa.int8(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
    ]
)
COUNTS_SCHEMA = pa.schema([pa.field("token_id", pa.int32(), nullable=False),
                           pa.field("count", pa.int64(), nullable=False)])
ENCODE_BATCH = 2048


@dataclass(frozen=True)
class PairsConfig(Config):
    tokenizer_sha256: str  # content hash of the tokenizer files (a moved copy resumes fine)
    max_seq_len: int = 512
    short_seq_prob: float = 0.1
    nsp: bool = True
    seed: int = 0
    # True: a one-sentence chunk may be split into A|B (label 0) so labels stay 50/50 on corpora of
    # short documents; False: BERT's exact rule (always a random B, label 1).
    balance_single_sentence: bool = True

    def check(self) -> None:
        n = type(self).__name__
        require(8 <= self.max_seq_len <= 65536, n, "max_seq_len", f"must be in [8, 65536], got {self.max_seq_len}")
        require(0.0 <= self.short_seq_prob <= 1.0, n, "short_seq_prob", f"must be in [0, 1], got {self.short_seq_prob}")


# -- tokenizer --------------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """A transformers fast tokenizer (cached per process: each worker loads it once)."""
    tok = _tokenizer_class(path).from_pretrained(path)
    if not tok.is_fast:
        raise ValueError(f"{path}: a fast tokenizer (tokenizer.json) is required")
    for name in ("cls_token_id", "sep_token_id", "mask_token_id", "pad_token_id"):
        if getattr(tok, name) is None:
            raise ValueError(f"{path}: tokenizer has no {name.removesuffix('_id')}; BERT data needs [CLS] [SEP] [MASK] [PAD]")
    return tok


def _tokenizer_class(path: str):
    """The tokenizer's own class when the folder names it (or is a BERT-family model), else AutoTokenizer.

    ``AutoTokenizer`` imports torch (~270 MB per process); worker processes of the data stages only need
    the tokenizer, so the class is looked up directly when the folder says what it is."""
    import json
    import os

    import transformers

    name = None
    tc, mc = os.path.join(path, "tokenizer_config.json"), os.path.join(path, "config.json")
    if os.path.isfile(tc):
        with open(tc, encoding="utf-8") as f:
            name = json.load(f).get("tokenizer_class")
    if not name and os.path.isfile(mc):
        with open(mc, encoding="utf-8") as f:
            if json.load(f).get("model_type") in ("bert", "distilbert"):
                name = "BertTokenizer"
    if name:
        for candidate in (name, name.removesuffix("Fast") + "Fast", name.removesuffix("Fast")):
            cls = getattr(transformers, candidate, None)
            if cls is not None:
                return cls
    return transformers.AutoTokenizer


def tokenizer_sha256(path: str) -> str:
    """Hash of what determines the ids (the tokenizer pipeline and special tokens), not of the file
    bytes: a tokenizer re-saved with ``save_pretrained`` hashes the same as its source."""
    import json

    tok = load_tokenizer(path)
    spec = json.loads(tok.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    spec["special_tokens"] = {k: str(v) for k, v in sorted(tok.special_tokens_map.items())}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def encode_sentences(tok, sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Sentences -> (flat int32 ids, int64 offsets [n+1]); ids equal ``tok(s, add_special_tokens=False)``."""
    backend = tok.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    chunks: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    for i in range(0, len(sentences), ENCODE_BATCH):
        # per batch straight to numpy: a part's ids never exist as one big list of Python ints
        ids = [e.ids for e in encode(sentences[i: i + ENCODE_BATCH], add_special_tokens=False)]
        lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        chunks.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lens.sum())))
        lengths.append(lens)
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(all_lengths) + 1, dtype=np.int64)
    np.cumsum(all_lengths, out=offsets[1:])
    flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    return flat, offsets


# -- documents ---------------------------------------------------------------------------------------
class TokenizedPart:
    """One corpus part, tokenized: document d has sentences ``doc_sents[d]`` (indices into offsets)."""

    def __init__(self, source: str | pa.Table, tok):
        table = read_parquet(source, columns=["doc_id", "sentences"]) if isinstance(source, str) else source
        self.doc_ids: list[str] = table.column("doc_id").to_pylist()
        sents = table.column("sentences").combine_chunks()
        doc_offsets = sents.offsets.to_numpy().astype(np.int64)
        self.flat, self.offsets = encode_sentences(tok, sents.values.to_pylist())
        lengths = np.diff(self.offsets)
        self.empty_sentences = int((lengths == 0).sum())
        # Sentences that tokenize to nothing (e.g. only control characters) are dropped.
        self.doc_sents = [
            [int(i) for i in range(doc_offsets[d], doc_offsets[d + 1]) if lengths[i] > 0]
            for d in range(len(self.doc_ids))
        ]

    def tokens(self, sent: int) -> np.ndarray:
        return self.flat[self.offsets[sent]: self.offsets[sent + 1]]

    def length(self, sent: int) -> int:
        return int(self.offsets[sent + 1] - self.offsets[sent])


@dataclass
class _Segment:
    """Tokens of consecutive sentences ``[first, last]`` of one document of one part."""

    part: TokenizedPart
    sents: list[int]

    def tokens(self) -> np.ndarray:
        if not self.sents:
            return np.zeros(0, dtype=np.int32)
        lo, hi = self.part.offsets[self.sents[0]], self.part.offsets[self.sents[-1] + 1]
        return self.part.flat[lo:hi]  # consecutive sentences are contiguous in ``flat``


def truncate_pair(a: np.ndarray, b: np.ndarray, max_tokens: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """BERT's truncate_seq_pair in closed form. Returns (a, b, tokens removed).

    BERT removes one token at a time from the longer segment (B on ties), front or back with a coin
    flip. Equivalently: the longer segment first loses ``|len(a)-len(b)|`` tokens, then the remaining
    removals alternate B, A, B, ...; each segment's front/back split is Binomial(k, 1/2).
    """
    la, lb = len(a), len(b)
    excess = la + lb - max_tokens
    if excess <= 0:
        return a, b, 0
    ka = kb = 0
    diff = min(abs(la - lb), excess)
    if la > lb:
        ka += diff
    else:
        kb += diff
    rest = excess - diff
    kb += (rest + 1) // 2
    ka += rest // 2
    fa = int(rng.binomial(ka, 0.5)) if ka else 0
    fb = int(rng.binomial(kb, 0.5)) if kb else 0
    return a[fa: la - (ka - fa)], b[fb: lb - (kb - fb)], excess


class PartPairs:
    """Accumulates instances of one part as flat arrays (no per-token Python objects)."""

    def __init__(self) -> None:
        self.ids: list[np.ndarray] = []
        self.types: list[np.ndarray] = []
        self.labels: list[int] = []
        self.doc_ids: list[str] = []

    def add(self, cls_id: int, sep_id: int, a: np.ndarray, b: np.ndarray | None, label: int, doc_id: str) -> None:
        if b is None:
            seq = np.concatenate(([cls_id], a, [sep_id])).astype(np.int32)
            types = np.zeros(len(seq), dtype=np.int8)
        else:
            seq = np.concatenate(([cls_id], a, [sep_id], b, [sep_id])).astype(np.int32)
            types = np.zeros(len(seq), dtype=np.int8)
            types[len(a) + 2:] = 1  # 0 through the first [SEP], 1 after
        self.ids.append(seq)
        self.types.append(types)
        self.labels.append(label)
        self.doc_ids.append(doc_id)

    def table(self) -> pa.Table:
        lengths = np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))
        offsets = np.zeros(len(self.ids) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        flat_ids = np.concatenate(self.ids) if self.ids else np.zeros(0, dtype=np.int32)
        flat_types = np.concatenate(self.types) if self.types else np.zeros(0, dtype=np.int8)
        return pa.Table.from_arrays(
            [
                pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_ids, pa.int32())),
                pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_types, pa.int8())),
                pa.array(np.asarray(self.labels, dtype=np.int8), pa.int8()),
                pa.array(self.doc_ids, pa.string()),
            ],
            schema=PAIRS_SCHEMA,
        )


def make_pairs(part: TokenizedPart, cfg: PairsConfig, rng: np.random.Generator, cls_id: int, sep_id: int,
               borrow: TokenizedPart | None = None) -> tuple[PartPairs, Counter[str]]:
    """All instances of one tokenized part (see the module docstring for the algorithm)."""
    out = PartPairs()
    counts: Counter[str] = Counter()
    docs = [d for d in range(len(part.doc_ids)) if part.doc_sents[d]]
    counts["empty_documents"] += len(part.doc_ids) - len(docs)
    if not cfg.nsp:
        for d in docs:
            _contiguous_segments(part, d, cfg, rng, out, counts, cls_id, sep_id)
        return out, counts

    max_tokens = cfg.max_seq_len - 3
    for pos, d in enumerate(docs):
        sents = part.doc_sents[d]
        target = max_tokens
        if rng.random() < cfg.short_seq_prob:
            target = int(rng.integers(2, max_tokens + 1))
        chunk: list[int] = []
        chunk_len = 0
        i = 0
        while i < len(sents):
            chunk.append(sents[i])
            chunk_len += part.length(sents[i])
            if i == len(sents) - 1 or chunk_len >= target:
                a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
                a = _Segment(part, chunk[:a_end]).tokens()
                single = len(chunk) == 1
                split_single = single and cfg.balance_single_sentence and len(a) >= 2
                if (single and not split_single) or rng.random() < 0.5:
                    label = 1
                    b = _random_b(part, pos, docs, borrow, target - len(a), rng, counts)
                    i -= len(chunk) - a_end  # put the unused sentences back
                elif split_single:
                    # A one-sentence chunk: BERT would force a random B (label 1), which skews labels
                    # towards 1 on corpora of short documents. Split the sentence instead: B is still
                    # the text that really follows A.
                    label = 0
                    whole = a
                    cut = int(rng.integers(1, len(whole)))
                    a, b = whole[:cut], whole[cut:]
                    counts["label_0_split_sentence"] += 1
                else:
                    label = 0
                    b = _Segment(part, chunk[a_end:]).tokens()
                a, b, removed = truncate_pair(a, b, max_tokens, rng)
                counts["truncated_pairs"] += removed > 0
                counts["truncated_tokens"] += removed
                out.add(cls_id, sep_id, a, b, label, part.doc_ids[d])
                counts[f"label_{label}"] += 1
                chunk, chunk_len = [], 0
            i += 1
    return out, counts


def _random_b(part: TokenizedPart, pos: int, docs: list[int], borrow: TokenizedPart | None, target_b: int,
              rng: np.random.Generator, counts: Counter[str]) -> np.ndarray:
    """Tokens of a random other document, from a random sentence on, until ``target_b`` tokens.

    ``docs[pos]`` is A's document; B's document is drawn uniformly from the others of this part."""
    src = part
    if len(docs) >= 2:
        k = int(rng.integers(0, len(docs) - 1))
        other = docs[k + (k >= pos)]  # skip A's own document
    elif borrow is not None and any(borrow.doc_sents):
        src = borrow
        non_empty = [x for x in range(len(borrow.doc_ids)) if borrow.doc_sents[x]]
        other = non_empty[int(rng.integers(0, len(non_empty)))]
        counts["random_b_from_next_part"] += 1
    else:  # the whole corpus is one document: BERT then also falls back to the same document
        other = docs[pos]
        counts["random_b_from_same_document"] += 1
    sents = src.doc_sents[other]
    start = int(rng.integers(0, len(sents)))
    taken: list[int] = []
    length = 0
    for s in sents[start:]:
        taken.append(s)
        length += src.length(s)
        if length >= target_b:
            break
    return _Segment(src, taken).tokens()


def _contiguous_segments(part: TokenizedPart, d: int, cfg: PairsConfig, rng: np.random.Generator,
                         out: PartPairs, counts: Counter[str], cls_id: int, sep_id: int) -> None:
    """DistilBERT/RoBERTa style: pack consecutive sentences of the document into ``[CLS] S [SEP]``.
    A sentence longer than the budget is split across sequences (no text is dropped)."""
    max_tokens = cfg.max_seq_len - 2
    target = max_tokens
    if rng.random() < cfg.short_seq_prob:
        target = int(rng.integers(2, max_tokens + 1))
    tokens = np.concatenate([part.tokens(s) for s in part.doc_sents[d]])
    bounds = np.cumsum([part.length(s) for s in part.doc_sents[d]])  # sentence ends
    start = 0
    while start < len(tokens):
        # end at the last sentence boundary within the target; a sentence that is too long is split
        limit = start + target
        fits = bounds[(bounds > start) & (bounds <= limit)]
        end = int(fits[-1]) if len(fits) else min(limit, len(tokens))
        counts["split_sentences"] += not len(fits)
        out.add(cls_id, sep_id, tokens[start:end], None, NO_NSP_LABEL, part.doc_ids[d])
        counts["segments"] += 1
        start = end


CHUNK_DOCS = 8192


def _doc_chunks(corpus_url: str):
    """Row groups of a corpus part, grouped into chunks of >= CHUNK_DOCS documents (the last chunk
    absorbs a small remainder so that no chunk holds a lone document when the part has more)."""
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(corpus_url, "rb") as f:
        pf = pq.ParquetFile(f)
        groups: list[list[int]] = [[]]
        rows = 0
        for g in range(pf.num_row_groups):
            if rows >= CHUNK_DOCS:
                groups.append([])
                rows = 0
            groups[-1].append(g)
            rows += pf.metadata.row_group(g).num_rows
        if len(groups) > 1 and rows < CHUNK_DOCS // 4:  # fold a short tail into the previous chunk
            groups[-2].extend(groups.pop())
        for gs in groups:
            if gs:
                yield pf.read_row_groups(gs, columns=["doc_id", "sentences"])


# -- unit of work --------------------------------------------------------------------------------------
def pairs_part(corpus_url: str, key: str, neighbour_url: str | None, stage: StageDir, cfg: PairsConfig,
               tokenizer_path: str) -> dict[str, Any]:
    """Tokenize one corpus part, build its instances, write ``pairs/<key>.parquet`` and its counts."""
    tok = load_tokenizer(tokenizer_path)
    rng = derive_rng(cfg.seed, "pairs", key)
    counts: Counter[str] = Counter()
    tables = []
    # A part is processed in chunks of ~CHUNK_DOCS documents (whole Parquet row groups): memory stays
    # a few tens of MB whatever the part size; random B documents come from the same chunk.
    for chunk in _doc_chunks(corpus_url):
        part = TokenizedPart(chunk, tok)
        borrow = None
        if cfg.nsp and sum(1 for s in part.doc_sents if s) < 2 and neighbour_url:
            borrow = TokenizedPart(neighbour_url, tok)
        pairs, c = make_pairs(part, cfg, rng, tok.cls_token_id, tok.sep_token_id, borrow)
        counts.update(c)
        counts["empty_sentences"] += part.empty_sentences
        counts["sentences"] += len(part.offsets) - 1
        counts["documents"] += len(part.doc_ids)
        tables.append(pairs.table())
        del pairs, part, borrow
    table = pa.concat_tables(tables) if tables else PAIRS_SCHEMA.empty_table()
    del tables
    name = f"{key}.parquet"
    write_parquet(table, join(stage.url, name))
    # Token frequencies (for frequency-smoothed masking), only non-zero entries.
    flat = table.column("input_ids").combine_chunks().values.to_numpy()
    n_tokens = len(flat)
    bins = np.bincount(flat, minlength=len(tok))
    nz = np.flatnonzero(bins)
    counts_table = pa.Table.from_arrays([pa.array(nz.astype(np.int32)), pa.array(bins[nz].astype(np.int64))],
                                        schema=COUNTS_SCHEMA)
    write_parquet(counts_table, join(stage.url, "_counts", name))
    stats = {"files": [{"file": name, "rows": table.num_rows, "tokens": n_tokens}], "counts": dict(counts),
             "skipped": {}, "input": corpus_url.rsplit("/", 1)[-1]}
    stage.mark_done(key, stats)
    release_memory()
    return stats


def merge_token_counts(stage_url: str, keys: list[str], vocab_size: int) -> np.ndarray:
    """Sum the per-part counts into ``pairs/token_counts.parquet``; returns int64 [vocab]."""
    total = np.zeros(vocab_size, dtype=np.int64)
    for key in keys:
        t = read_parquet(join(stage_url, "_counts", f"{key}.parquet"))
        np.add.at(total, t.column("token_id").to_numpy(), t.column("count").to_numpy())
    nz = np.flatnonzero(total)
    write_parquet(pa.Table.from_arrays([pa.array(nz.astype(np.int32)), pa.array(total[nz])], schema=COUNTS_SCHEMA),
                  join(stage_url, "token_counts.parquet"))
    return total


def read_token_counts(pairs_url: str, vocab_size: int) -> np.ndarray:
    t = read_parquet(join(pairs_url, "token_counts.parquet"))
    out = np.zeros(vocab_size, dtype=np.int64)
    out[t.column("token_id").to_numpy()] = t.column("count").to_numpy()
    return out
