"""Rule-based English sentence splitter (no model download, ~30 MB/s per core).

Splits after ``.``, ``!``, ``?`` (and ``…``), optionally followed by closing quotes/brackets, when
whitespace and then an upper-case letter, digit or opening quote follow -- unless the word before the
period is a known abbreviation (``Mr.``, ``e.g.``, ``St.`` ...) or a single initial (``J. R. R.``).
Dialogue such as ``"Who are you?" said Alice.`` stays one sentence because a lower-case word follows.
Good enough for building sentence pairs; it is not a linguistic parser.
"""

from __future__ import annotations

import re

ABBREVIATIONS = frozenset(
    ["mr", "mrs", "ms", "messrs", "mme", "mlle", "dr", "prof", "rev", "revd", "fr", "hon", "st", "ste", "mt", "ft", "jr", "sr", "gen", "col", "capt", "cpt", "lt", "sgt", "maj", "adm", "cmdr", "gov", "pres", "supt", "insp", "esq", "sen", "rep", "vs", "etc", "e.g", "i.e", "viz", "cf", "al", "ca", "approx", "no", "nos", "vol", "vols", "p", "pp", "ch", "chap", "fig", "figs", "ed", "eds", "inc", "ltd", "co", "corp", "bros", "dept", "univ", "assn", "ave", "blvd", "rd", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "mon", "tue", "tues", "wed", "thu", "thur", "thurs", "fri", "sat", "sun", "u.s", "u.k", "a.m", "p.m", "b.c", "a.d"]
)

# Candidate boundary: terminal punctuation, closing quotes/brackets, whitespace, then a sentence start.
_BOUNDARY = re.compile(r"""([.!?\u2026]+)(["'\u201d\u2019)\]]*)\s+(?=["'\u201c\u2018(\[]*[A-Z0-9])""")
_WORD_REV = re.compile(r"""[\w.'-]+""")  # a word, matched backwards on the reversed text


def normalize_whitespace(text: str) -> str:
    """Collapse runs of whitespace (including CR/LF from hard-wrapped lines) to one space."""
    return " ".join(text.split())  # str.split() uses the same Unicode whitespace as re's \s, ~4x faster


def split_sentences(text: str) -> list[str]:
    """Split normalised text into sentences; returns [] for blank text."""
    text = normalize_whitespace(text)
    if not text:
        return []
    out: list[str] = []
    start = 0
    rev = ""  # the text reversed, made on the first period: the word before a period is a prefix match there
    for m in _BOUNDARY.finditer(text):
        if m.group(1) == ".":
            if not rev:
                rev = text[::-1]
            if _is_abbreviation(text, rev, m.start(1)):
                continue
        end = m.end(2)
        sentence = text[start:end].strip()
        if sentence:
            out.append(sentence)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def _is_abbreviation(text: str, rev: str, period_pos: int) -> bool:
    """Is the word just before ``text[period_pos]`` (at most 32 characters of ``[\\w.'-]``) an abbreviation?"""
    m = _WORD_REV.match(rev, len(text) - period_pos)
    if not m:
        return False
    n = min(m.end() - m.start(), 32)
    word = text[period_pos - n: period_pos].lstrip("'\"(").lower()
    if len(word) == 1 and word.isalpha():
        return True  # an initial: "J. Smith"
    return word in ABBREVIATIONS or word.rstrip(".") in ABBREVIATIONS
