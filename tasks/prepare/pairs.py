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

import dataclasses
import hashlib
import json
import os
import re
import weakref
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa

from distilflow.tasks.core.config import Config, require
from distilflow.tasks.core.io import ParquetRowGroups, join, read_parquet, release_memory, write_parquet
from distilflow.tasks.core.rng import derive_rng
from distilflow.tasks.core.stage import StageDir, token_counts_url
from distilflow.tasks.prepare.masking import Vocab

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
    # The random stream's use changed in version 2 (block draws); part of the fingerprint, so an output
    # folder written by another version is refused on resume instead of mixing parts of both.
    algorithm_version: int = 2

    def check(self) -> None:
        n = type(self).__name__
        require(8 <= self.max_seq_len <= 65536, n, "max_seq_len", f"must be in [8, 65536], got {self.max_seq_len}")
        require(0.0 <= self.short_seq_prob <= 1.0, n, "short_seq_prob", f"must be in [0, 1], got {self.short_seq_prob}")
        require(self.algorithm_version == 2, n, "algorithm_version",
                f"this version of distilflow builds pairs with algorithm 2, not {self.algorithm_version}")


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
    tok = load_tokenizer(path)
    spec = json.loads(tok.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    spec["special_tokens"] = {k: str(v) for k, v in sorted(tok.special_tokens_map.items())}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TokenizerInfo:
    """What the pairs and mask units need to know about the tokenizer, worked out once in the flow process
    (with transformers) and sent to the workers, which then import neither transformers nor torch: they
    encode from ``tokenizer.json`` alone (:func:`encoder_for`)."""

    path: str  # folder with tokenizer.json (DIR/tokenizer; a remote one is fetched by the worker)
    cls_id: int
    sep_id: int
    vocab_size: int  # len(tokenizer): token counts have this many bins
    vocab: Vocab

    @classmethod
    def load(cls, path: str) -> TokenizerInfo:
        tok = load_tokenizer(path)
        return cls(path, int(tok.cls_token_id), int(tok.sep_token_id), len(tok), Vocab.from_tokenizer(tok))

    def at(self, path: str) -> TokenizerInfo:
        return dataclasses.replace(self, path=path)


class Encoder:
    """Sentences -> flat token ids, exactly as Hugging Face ``tokenizers`` encodes them without special tokens.

    ``nanotoken`` (Rust WordPiece, ~50x faster on one thread; ids tested equal to ``tokenizers`` on real,
    random and adversarial text, cased and uncased) when it supports the tokenizer; otherwise
    ``tokenizers`` itself, with the ASCII fast path of :func:`_ascii_fast_path`. ``backend`` says which;
    the flow logs it and the pairs manifest records it."""

    def __init__(self, tokenizer_json: str, prefer: str = "nanotoken"):
        self.backend, self.reason = "tokenizers", ""
        self._nt = None
        if prefer == "nanotoken":
            try:
                from nanotoken import WordPieceTokenizer

                self._nt = WordPieceTokenizer.from_json(tokenizer_json)
                self.backend = "nanotoken"
            except ImportError:
                self.reason = "nanotoken is not installed"
            except ValueError as e:  # UnsupportedTokenizerError: not a BERT-style WordPiece pipeline
                self.reason = f"nanotoken does not support this tokenizer ({' '.join(str(e).split())[:200]})"
        if self._nt is None:
            from tokenizers import Tokenizer

            self._hf = Tokenizer.from_str(tokenizer_json)
            self._hf.no_truncation()
            self._hf.no_padding()
            self._fast = _fast_path_plan(self._hf)

    def encode(self, sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(flat int32 ids, int64 offsets [n + 1]): sentence i is ``flat[offsets[i]:offsets[i + 1]]``."""
        if self._nt is not None:
            ids, offsets = self._nt.encode_batch(sentences, add_special_tokens=False, parallel=False)
            return ids.astype(np.int32), offsets.astype(np.int64, copy=False)
        return _encode_hf(self._hf, self._fast, sentences)


@lru_cache(maxsize=4)
def encoder_for(path: str) -> Encoder:
    """The encoder of the tokenizer folder ``path`` (one per process)."""
    with open(os.path.join(path, "tokenizer.json"), encoding="utf-8") as f:
        return Encoder(f.read())


_ENCODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def encode_sentences(tok, sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Sentences -> (flat int32 ids, int64 offsets [n+1]); ids equal ``tok(s, add_special_tokens=False)``.
    ``tok``: an :class:`Encoder` or a transformers fast tokenizer."""
    if not isinstance(tok, Encoder):
        if tok not in _ENCODERS:
            _ENCODERS[tok] = Encoder(tok.backend_tokenizer.to_str())
        tok = _ENCODERS[tok]
    return tok.encode(sentences)


def _encode_hf(backend, fast, sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The Hugging Face ``tokenizers`` path (the fallback): batches, ASCII fast path past BertNormalizer."""
    chunks: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    for i in range(0, len(sentences), ENCODE_BATCH):
        batch = sentences[i: i + ENCODE_BATCH]
        if fast is None:
            ids = [e.ids for e in _encode(backend, batch)]
        else:
            fast_backend, lower, added = fast
            easy = [s.isascii() and s.isprintable() and not added.search(s) for s in batch]
            on_fast = [j for j, ok in enumerate(easy) if ok]
            on_full = [j for j, ok in enumerate(easy) if not ok]
            ids = [None] * len(batch)
            texts = [batch[j].lower() if lower else batch[j] for j in on_fast]
            for j, e in zip(on_fast, _encode(fast_backend, texts), strict=True):
                ids[j] = e.ids
            for j, e in zip(on_full, _encode(backend, [batch[j] for j in on_full]), strict=True):
                ids[j] = e.ids
        # per batch straight to Arrow (its list conversion runs in C++): a part's ids never exist as
        # one big list of Python ints
        arr = pa.array(ids, pa.list_(pa.int32()))
        chunks.append(arr.values.to_numpy())
        lengths.append(np.diff(arr.offsets.to_numpy()))
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(all_lengths) + 1, dtype=np.int64)
    np.cumsum(all_lengths, out=offsets[1:])
    flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    return flat, offsets


def _encode(backend, texts: list[str]) -> list:
    if not texts:
        return []
    return getattr(backend, "encode_batch_fast", backend.encode_batch)(texts, add_special_tokens=False)


_FAST_PATHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _ascii_fast_path(tok):
    """``(backend without normalizer, lowercase, added-token regex)`` when the normalizer is BERT's, else None.

    ``tok``: a transformers fast tokenizer (cached per object). On printable ASCII text
    ``BertNormalizer`` is exactly ``str.lower()`` (identity when not lowercasing): clean_text drops control
    characters and maps whitespace to " " (printable ASCII has neither, besides " "); accent stripping (NFD,
    drop combining marks) and CJK spacing change nothing. Python's ``lower`` is ~1000x faster than the
    normalizer's alignment-tracking pass, so such sentences tokenize ~1.5x faster with the same ids;
    everything else (non-ASCII, control characters, text containing an added token such as ``[MASK]``,
    matched case-insensitively to be safe) goes through the full tokenizer. Used only when nanotoken is not."""
    if tok not in _FAST_PATHS:
        _FAST_PATHS[tok] = _fast_path_plan(tok.backend_tokenizer)
    return _FAST_PATHS[tok]


def _fast_path_plan(backend):
    from tokenizers import Tokenizer

    spec = json.loads(backend.to_str())
    norm = spec.get("normalizer") or {}
    plan = None
    if norm.get("type") == "BertNormalizer":
        fast = Tokenizer.from_str(backend.to_str())
        fast.normalizer = None
        fast.no_truncation()
        fast.no_padding()
        added = [t["content"] for t in spec.get("added_tokens", [])] or ["\x00"]
        plan = (fast, bool(norm.get("lowercase")), re.compile("|".join(map(re.escape, added)), re.IGNORECASE))
    return plan


# -- documents ---------------------------------------------------------------------------------------
class TokenizedPart:
    """One corpus part, tokenized: document d has sentences ``doc_sents[d]`` (indices into offsets).
    Sentence s is ``flat[offsets[s]:offsets[s + 1]]``; the sentences of a document are contiguous."""

    def __init__(self, source: str | pa.Table, tok):
        table = read_parquet(source, columns=["doc_id", "sentences"]) if isinstance(source, str) else source
        self.doc_ids: list[str] = table.column("doc_id").to_pylist()
        sents = table.column("sentences").combine_chunks()
        doc_offsets = sents.offsets.to_numpy().astype(np.int64)
        self.flat, offsets = encode_sentences(tok, sents.values.to_pylist())
        lengths = np.diff(offsets)
        self.empty_sentences = int((lengths == 0).sum())
        # Sentences that tokenize to nothing (e.g. only control characters) are dropped.
        keep = np.flatnonzero(lengths > 0)
        bounds = np.searchsorted(keep, doc_offsets).tolist()
        kept = keep.tolist()
        self.doc_sents = [kept[bounds[d]: bounds[d + 1]] for d in range(len(self.doc_ids))]
        # Python ints: make_pairs reads them per instance (numpy scalars are ~10x slower there)
        self.offsets: list[int] = offsets.tolist()

    def tokens(self, sent: int) -> np.ndarray:
        return self.flat[self.offsets[sent]: self.offsets[sent + 1]]


def truncate_cuts(la: int, lb: int, max_tokens: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """BERT's truncate_seq_pair in closed form: tokens to cut from (A's front, A's back, B's front,
    B's back) so that ``la + lb <= max_tokens``.

    BERT removes one token at a time from the longer segment (B on ties), front or back with a coin
    flip. Equivalently: the longer segment first loses ``|la - lb|`` tokens, then the remaining
    removals alternate B, A, B, ...; each segment's front/back split is Binomial(k, 1/2).
    """
    excess = la + lb - max_tokens
    if excess <= 0:
        return 0, 0, 0, 0
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
    return fa, ka - fa, fb, kb - fb


class PartPairs:
    """The instances of one part as token *ranges* into a flat id array; :meth:`table` assembles all
    sequences at once with numpy (no per-instance arrays)."""

    def __init__(self, flat: np.ndarray, cls_id: int, sep_id: int) -> None:
        self.flat, self.cls_id, self.sep_id = flat, cls_id, sep_id
        self.a_lo: list[int] = []
        self.a_hi: list[int] = []
        self.b_lo: list[int] = []  # -1: no B (single segment ``[CLS] S [SEP]``)
        self.b_hi: list[int] = []
        self.labels: list[int] = []
        self.doc_ids: list[str] = []

    def add(self, a_lo: int, a_hi: int, b_lo: int, b_hi: int, label: int, doc_id: str) -> None:
        self.a_lo.append(a_lo)
        self.a_hi.append(a_hi)
        self.b_lo.append(b_lo)
        self.b_hi.append(b_hi)
        self.labels.append(label)
        self.doc_ids.append(doc_id)

    def __len__(self) -> int:
        return len(self.labels)

    def table(self) -> pa.Table:
        a_lo = np.asarray(self.a_lo, dtype=np.int64)
        la = np.asarray(self.a_hi, dtype=np.int64) - a_lo  # [n]
        b_lo = np.asarray(self.b_lo, dtype=np.int64)
        has_b = b_lo >= 0
        lb = np.where(has_b, np.asarray(self.b_hi, dtype=np.int64) - b_lo, 0)  # [n]
        # [CLS] A [SEP] (B [SEP]): every position not written below is a [SEP]
        seq_len = la + 2 + np.where(has_b, lb + 1, 0)
        offsets = np.zeros(len(la) + 1, dtype=np.int64)
        np.cumsum(seq_len, out=offsets[1:])
        start = offsets[:-1]
        ids = np.full(int(offsets[-1]), self.sep_id, dtype=np.int32)
        ids[start] = self.cls_id
        ids[_ranges(start + 1, la)] = self.flat[_ranges(a_lo, la)]
        ids[_ranges(start + la + 2, lb)] = self.flat[_ranges(b_lo, lb)]
        types = np.zeros(len(ids), dtype=np.int8)
        types[_ranges(start + la + 2, np.where(has_b, lb + 1, 0))] = 1  # 1 after the first [SEP]
        off32 = pa.array(offsets.astype(np.int32))
        return pa.Table.from_arrays(
            [
                pa.ListArray.from_arrays(off32, pa.array(ids, pa.int32())),
                pa.ListArray.from_arrays(off32, pa.array(types, pa.int8())),
                pa.array(np.asarray(self.labels, dtype=np.int8), pa.int8()),
                pa.array(self.doc_ids, pa.string()),
            ],
            schema=PAIRS_SCHEMA,
        )


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + n)`` for each (s, n), without a Python loop."""
    total = int(lengths.sum())
    first = np.cumsum(lengths) - lengths  # where each range begins in the output
    return np.arange(total, dtype=np.int64) + np.repeat(starts - first, lengths)


def make_pairs(part: TokenizedPart, cfg: PairsConfig, rng: np.random.Generator, cls_id: int, sep_id: int,
               borrow: TokenizedPart | None = None) -> tuple[PartPairs, Counter[str]]:
    """All instances of one tokenized part (see the module docstring for the algorithm)."""
    # A B borrowed from the next part indexes its tokens after this part's (shifted by len(part.flat)).
    out = PartPairs(part.flat if borrow is None else np.concatenate([part.flat, borrow.flat]), cls_id, sep_id)
    counts: Counter[str] = Counter()
    draw = Uniforms(rng)
    docs = [d for d in range(len(part.doc_ids)) if part.doc_sents[d]]
    counts["empty_documents"] += len(part.doc_ids) - len(docs)
    if not cfg.nsp:
        for d in docs:
            _contiguous_segments(part, d, cfg, draw, out, counts)
        return out, counts

    offsets = part.offsets  # sentence s spans offsets[s]:offsets[s + 1] of out.flat
    max_tokens = cfg.max_seq_len - 3
    for pos, d in enumerate(docs):
        sents = part.doc_sents[d]
        target = max_tokens
        if draw.random() < cfg.short_seq_prob:
            target = draw.integers(2, max_tokens + 1)
        first = 0  # the chunk is sents[first:i + 1]: consecutive sentences, contiguous tokens
        i = 0
        while i < len(sents):
            chunk_lo = offsets[sents[first]]
            if i == len(sents) - 1 or offsets[sents[i] + 1] - chunk_lo >= target:
                n_chunk = i + 1 - first
                a_end = first + (draw.integers(1, n_chunk) if n_chunk >= 2 else 1)  # A = sents[first:a_end]
                a_lo, a_hi = chunk_lo, offsets[sents[a_end - 1] + 1]
                single = n_chunk == 1
                split_single = single and cfg.balance_single_sentence and a_hi - a_lo >= 2
                if (single and not split_single) or draw.random() < 0.5:
                    label = 1
                    b_lo, b_hi = _random_b(part, pos, docs, borrow, target - (a_hi - a_lo), draw, counts)
                    i = a_end - 1  # put the unused sentences back
                elif split_single:
                    # A one-sentence chunk: BERT would force a random B (label 1), which skews labels
                    # towards 1 on corpora of short documents. Split the sentence instead: B is still
                    # the text that really follows A.
                    label = 0
                    cut = a_lo + draw.integers(1, a_hi - a_lo)
                    a_hi, b_lo, b_hi = cut, cut, a_hi
                    counts["label_0_split_sentence"] += 1
                else:
                    label = 0
                    b_lo, b_hi = a_hi, offsets[sents[i] + 1]
                fa, ba, fb, bb = truncate_cuts(a_hi - a_lo, b_hi - b_lo, max_tokens, rng)
                removed = fa + ba + fb + bb
                counts["truncated_pairs"] += removed > 0
                counts["truncated_tokens"] += removed
                out.add(a_lo + fa, a_hi - ba, b_lo + fb, b_hi - bb, label, part.doc_ids[d])
                counts[f"label_{label}"] += 1
                first = i + 1
            i += 1
    return out, counts


class Uniforms:
    """Scalar draws from a numpy Generator, fetched in blocks: a scalar ``rng.integers`` call costs
    microseconds, and pair building makes several per instance. Deterministic given the Generator."""

    def __init__(self, rng: np.random.Generator, block: int = 4096):
        self.rng, self.block = rng, block
        self.buf: list[float] = []
        self.pos = 0

    def random(self) -> float:
        """Uniform in [0, 1)."""
        if self.pos == len(self.buf):
            self.buf, self.pos = self.rng.random(self.block).tolist(), 0
        self.pos += 1
        return self.buf[self.pos - 1]

    def integers(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi) (hi > lo)."""
        return lo + int(self.random() * (hi - lo))


def _random_b(part: TokenizedPart, pos: int, docs: list[int], borrow: TokenizedPart | None, target_b: int,
              draw: Uniforms, counts: Counter[str]) -> tuple[int, int]:
    """Token range of a random other document, from a random sentence on, until ``target_b`` tokens.

    ``docs[pos]`` is A's document; B's document is drawn uniformly from the others of this part."""
    src, shift = part, 0
    if len(docs) >= 2:
        k = draw.integers(0, len(docs) - 1)
        other = docs[k + (k >= pos)]  # skip A's own document
    elif borrow is not None and any(borrow.doc_sents):
        src, shift = borrow, len(part.flat)
        non_empty = [x for x in range(len(borrow.doc_ids)) if borrow.doc_sents[x]]
        other = non_empty[draw.integers(0, len(non_empty))]
        counts["random_b_from_next_part"] += 1
    else:  # the whole corpus is one document: BERT then also falls back to the same document
        other = docs[pos]
        counts["random_b_from_same_document"] += 1
    sents = src.doc_sents[other]
    start = draw.integers(0, len(sents))
    lo = src.offsets[sents[start]]
    hi = lo
    for s in sents[start:]:
        hi = src.offsets[s + 1]
        if hi - lo >= target_b:
            break
    return lo + shift, hi + shift


def _contiguous_segments(part: TokenizedPart, d: int, cfg: PairsConfig, draw: Uniforms,
                         out: PartPairs, counts: Counter[str]) -> None:
    """DistilBERT/RoBERTa style: pack consecutive sentences of the document into ``[CLS] S [SEP]``.
    A sentence longer than the budget is split across sequences (no text is dropped)."""
    max_tokens = cfg.max_seq_len - 2
    target = max_tokens
    if draw.random() < cfg.short_seq_prob:
        target = draw.integers(2, max_tokens + 1)
    sents = part.doc_sents[d]
    bounds = [part.offsets[s + 1] for s in sents]  # sentence ends (the document's tokens are contiguous)
    start, end_of_doc = part.offsets[sents[0]], bounds[-1]
    j = 0  # first sentence end after ``start``
    while start < end_of_doc:
        # end at the last sentence boundary within the target; a sentence that is too long is split
        limit = start + target
        k = j
        while k < len(bounds) and bounds[k] <= limit:
            k += 1
        if k > j:
            end, j = bounds[k - 1], k
        else:
            end = min(limit, end_of_doc)
            counts["split_sentences"] += 1
        out.add(start, end, -1, -1, NO_NSP_LABEL, part.doc_ids[d])
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
               tokenizer: TokenizerInfo | str) -> dict[str, Any]:
    """Tokenize one corpus part, build its instances, write ``pairs/<key>.parquet`` and its counts."""
    info = tokenizer if isinstance(tokenizer, TokenizerInfo) else TokenizerInfo.load(tokenizer)
    tok = encoder_for(info.path)
    rng = derive_rng(cfg.seed, "pairs", key)
    counts: Counter[str] = Counter()
    bins = np.zeros(info.vocab_size, dtype=np.int64)  # token frequencies, for frequency-smoothed masking
    name = f"{key}.parquet"
    # A part is processed in chunks of ~CHUNK_DOCS documents (whole Parquet row groups): memory stays
    # a few tens of MB whatever the part size; random B documents come from the same chunk. Each chunk's
    # pairs are written as they come (the same bytes as one table written at the end).
    with ParquetRowGroups(join(stage.url, name), PAIRS_SCHEMA) as out:
        for chunk in _doc_chunks(corpus_url):
            part = TokenizedPart(chunk, tok)
            borrow = None
            if cfg.nsp and sum(1 for s in part.doc_sents if s) < 2 and neighbour_url:
                borrow = TokenizedPart(neighbour_url, tok)
            pairs, c = make_pairs(part, cfg, rng, info.cls_id, info.sep_id, borrow)
            counts.update(c)
            counts["empty_sentences"] += part.empty_sentences
            counts["sentences"] += len(part.offsets) - 1
            counts["documents"] += len(part.doc_ids)
            table = pairs.table()
            out.add(table)
            bins = _add_counts(bins, np.bincount(table.column("input_ids").combine_chunks().values.to_numpy()))
            del pairs, part, borrow, table
    n_tokens = int(bins.sum())
    nz = np.flatnonzero(bins)
    counts_table = pa.Table.from_arrays([pa.array(nz.astype(np.int32)), pa.array(bins[nz].astype(np.int64))],
                                        schema=COUNTS_SCHEMA)
    write_parquet(counts_table, stage.meta("counts", name))
    stats = {"files": [{"file": name, "rows": out.rows, "tokens": n_tokens}], "counts": dict(counts),
             "skipped": {}, "input": corpus_url.rsplit("/", 1)[-1]}
    stage.mark_done(key, stats)
    release_memory()
    return stats


def _add_counts(total: np.ndarray, more: np.ndarray) -> np.ndarray:
    if len(more) > len(total):  # an id beyond the vocabulary size (never from a consistent tokenizer)
        total = np.concatenate([total, np.zeros(len(more) - len(total), dtype=np.int64)])
    total[: len(more)] += more
    return total


def merge_token_counts(stage: StageDir, keys: list[str], vocab_size: int) -> np.ndarray:
    """Sum the per-part counts into ``DIR/token_counts/token_counts.parquet``; returns int64 [vocab]."""
    total = np.zeros(vocab_size, dtype=np.int64)
    for key in keys:
        t = read_parquet(stage.meta("counts", f"{key}.parquet"))
        np.add.at(total, t.column("token_id").to_numpy(), t.column("count").to_numpy())
    nz = np.flatnonzero(total)
    write_parquet(pa.Table.from_arrays([pa.array(nz.astype(np.int32)), pa.array(total[nz])], schema=COUNTS_SCHEMA),
                  token_counts_url(stage.root))
    return total


def read_token_counts(prepared_dir: str, vocab_size: int) -> np.ndarray:
    t = read_parquet(token_counts_url(prepared_dir))
    out = np.zeros(vocab_size, dtype=np.int64)
    out[t.column("token_id").to_numpy()] = t.column("count").to_numpy()
    return out
