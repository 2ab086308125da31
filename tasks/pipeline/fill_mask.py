"""The pipeline's fill-mask stage: held-out sentences with one word masked, and how often the model finds it.

:func:`mask_queries` writes ``queries.jsonl`` (``text`` with one ``[MASK]``, ``answer`` the removed word);
the batch fill-mask job predicts over it; :func:`fill_mask_accuracy` scores its predictions (top-1/top-5
against the removed word). No Prefect here.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

from distilflow.tasks.core.hf import local_model
from distilflow.tasks.core.io import listdir, read_bytes, read_parquet, write_bytes


def corpus_sentences(corpus_dir: str) -> list[str]:
    """Every sentence of a prepared ``corpus`` folder, parts in name order."""
    sentences: list[str] = []
    for f in sorted(u for u in listdir(corpus_dir, ".parquet") if posixpath.basename(u).startswith("part-")):
        for sents in read_parquet(f, columns=["sentences"]).column(0).to_pylist():
            sentences.extend(sents)
    return sentences


def mask_queries(heldout_corpus: str, out_file: str, tokenizer: str, rows: int, seed: int) -> int:
    """Held-out sentences with one whole word replaced by [MASK] (the answer kept in ``answer``).

    Candidate answers are alphabetic words that are one token of the vocabulary, so top-1 can be exact.
    Returns the number of queries written (at most ``rows``).
    """
    import numpy as np
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(local_model(tokenizer))
    vocab = tok.get_vocab()
    rng = np.random.default_rng(seed)
    sentences = corpus_sentences(heldout_corpus)
    queries = []
    for i in rng.permutation(len(sentences)):
        words = sentences[int(i)].split(" ")
        cands = [j for j, w in enumerate(words) if w.isalpha() and (w.lower() if tok.do_lower_case else w) in vocab]
        if len(words) < 4 or not cands:
            continue
        j = cands[int(rng.integers(0, len(cands)))]
        answer = words[j]
        words[j] = tok.mask_token
        queries.append({"text": " ".join(words), "answer": answer.lower() if tok.do_lower_case else answer})
        if len(queries) >= rows:
            break
    write_bytes(out_file, "".join(json.dumps(q) + "\n" for q in queries).encode("utf-8"))
    return len(queries)


def prediction_files(predictions: str) -> list[str]:
    """The Parquet files of a fill-mask output (a folder of parts, or one ``.parquet`` file)."""
    if predictions.endswith(".parquet"):
        return [predictions]
    return [u for u in listdir(predictions, ".parquet") if not posixpath.basename(u).startswith(("_", "."))]


def fill_mask_accuracy(queries_file: str, predictions: str) -> dict[str, Any]:
    """Top-1/top-5 accuracy of the fill-mask predictions against the removed words (``rows``, ``top1``, ``top5``)."""
    answers = [json.loads(line)["answer"] for line in read_bytes(queries_file).decode("utf-8").splitlines()]
    preds: dict[int, list[tuple[int, str]]] = {}
    for f in prediction_files(predictions):
        t = read_parquet(f, columns=["row_id", "rank", "token_str"])
        for row, rank, tok in zip(*(t.column(c).to_pylist() for c in ("row_id", "rank", "token_str")), strict=True):
            preds.setdefault(row, []).append((rank, tok.strip()))
    top1 = top5 = 0
    for i, ans in enumerate(answers):
        ranked = [t for _, t in sorted(preds.get(i, []))]
        top1 += bool(ranked) and ranked[0] == ans
        top5 += ans in ranked[:5]
    n = max(len(answers), 1)
    return {"rows": len(answers), "top1": round(top1 / n, 4), "top5": round(top5 / n, 4)}
