"""Our rule-based sentence splitter against pysbd (an independent rule-based splitter) on the shared books.

    python scripts/compare_splitters.py                 # all shared Gutenberg books
    python scripts/compare_splitters.py --show 15       # and 15 disagreements of each kind

Documents are what ``distilflow shard`` makes of the books (a blank line ends a document, whitespace
collapsed). For every document both splitters' sentence *ends* are taken as character offsets in the
same normalised text; a boundary both put is an agreement. Prints: boundaries of each, agreement
(both / either), each side's boundaries the other lacks, documents split identically, and examples of
each kind of disagreement (``|`` marks the boundary in question). pysbd is a dev dependency.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def documents(books: list[Path]) -> list[str]:
    from distilflow.tasks.prepare.sentences import normalize_whitespace

    docs = []
    for book in books:
        text = book.read_text(encoding="utf-8")
        docs += [d for d in (normalize_whitespace(p) for p in re.split(r"\n\s*\n", text)) if d]
    return docs


def ends(doc: str, sentences: list[str]) -> set[int]:
    """Offsets in ``doc`` just after each sentence but the last (the end of the text is not a decision)."""
    out, pos = set(), 0
    for s in sentences:
        s = s.strip()
        if not s:
            continue
        i = doc.find(s, pos)
        if i < 0:  # a splitter changed the text: align on its first word instead
            i = doc.find(s.split()[0], pos)
            if i < 0:
                continue
        pos = i + len(s)
        out.add(pos)
    out.discard(len(doc))
    return {e for e in out if e < len(doc)}


def inside_quotes(doc: str, pos: int) -> bool:
    """Is ``pos`` inside double-quoted speech (an odd number of double quotes before it)?"""
    before = doc[:pos]
    straight = before.count('"') % 2 == 1
    curly = before.count("\u201c") > before.count("\u201d")
    return straight or curly


def both_list(ours: list[set[int]], theirs: list[set[int]]) -> list[tuple[int, int]]:
    return [(i, e) for i, (o, t) in enumerate(zip(ours, theirs, strict=True)) for e in sorted(o & t)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--books", nargs="*", default=None, help="text files (default: the shared Gutenberg books)")
    ap.add_argument("--show", type=int, default=8, help="examples of each kind of disagreement")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    import pysbd

    from distilflow.tasks.prepare.sentences import split_sentences

    books = [Path(b) for b in a.books] if a.books else sorted((SHARED / "corpus" / "gutenberg").glob("pg*.txt"))
    docs = documents(books)
    seg = pysbd.Segmenter(language="en", clean=False)
    t0 = time.perf_counter()
    ours = [ends(d, split_sentences(d)) for d in docs]
    t1 = time.perf_counter()
    theirs = [ends(d, seg.segment(d)) for d in docs]
    t2 = time.perf_counter()
    mb = sum(len(d.encode()) for d in docs) / 1e6
    both = sum(len(o & t) for o, t in zip(ours, theirs, strict=True))
    only_ours = [(i, e) for i, (o, t) in enumerate(zip(ours, theirs, strict=True)) for e in sorted(o - t)]
    only_theirs = [(i, e) for i, (o, t) in enumerate(zip(ours, theirs, strict=True)) for e in sorted(t - o)]
    n_ours, n_theirs = sum(map(len, ours)), sum(map(len, theirs))
    same_docs = sum(o == t for o, t in zip(ours, theirs, strict=True))
    print(f"{len(books)} books, {len(docs):,} documents, {mb:.1f} MB; ours {mb / (t1 - t0):.1f} MB/s, "
          f"pysbd {mb / (t2 - t1):.2f} MB/s")
    print(f"sentence boundaries: ours {n_ours:,}, pysbd {n_theirs:,}, both {both:,}")
    print(f"agreement (both / either): {both / max(len(only_ours) + len(only_theirs) + both, 1):.4f}; "
          f"ours found by pysbd: {both / max(n_ours, 1):.4f}; pysbd's found by ours: {both / max(n_theirs, 1):.4f}")
    print(f"documents split identically: {same_docs:,} of {len(docs):,} ({same_docs / len(docs):.4f})")
    # pysbd keeps quoted speech whole; how much of the difference is that?
    quoted = [(i, e) for i, e in only_ours if inside_quotes(docs[i], e)]
    outside = [(i, e) for i, e in both_list(ours, theirs) if not inside_quotes(docs[i], e)]
    n_ours_out = sum(1 for i, o in enumerate(ours) for e in o if not inside_quotes(docs[i], e))
    n_theirs_out = sum(1 for i, t in enumerate(theirs) for e in t if not inside_quotes(docs[i], e))
    print(f"of ours that pysbd lacks, inside double quotes: {len(quoted):,} ({len(quoted) / max(len(only_ours), 1):.3f})")
    print(f"outside quotes: ours {n_ours_out:,}, pysbd {n_theirs_out:,}, both {len(outside):,}; agreement "
          f"{len(outside) / max(n_ours_out + n_theirs_out - len(outside), 1):.4f}")
    rng = random.Random(a.seed)
    kinds = (("only ours split here, inside quotes", quoted),
             ("only ours split here, outside quotes", [x for x in only_ours if not inside_quotes(docs[x[0]], x[1])]),
             ("only pysbd split here", only_theirs))
    for title, items in kinds:
        print(f"\n{title} ({len(items):,}):")
        for i, e in rng.sample(items, min(a.show, len(items))):
            d = docs[i]
            print(f"  ...{d[max(0, e - 50):e]}|{d[e:e + 40]}...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
