"""Rule-based English sentence splitter (no model download).

Splits after ``.``, ``!``, ``?`` (and ``…``), optionally followed by closing quotes/brackets, when
whitespace and then an upper-case letter, digit or opening quote follow -- unless the word before the
period is a known abbreviation (``Mr.``, ``e.g.``, ``St.`` ...) or an initial (``J. R. R.``).
Dialogue such as ``"Who are you?" said Alice.`` stays one sentence because a lower-case word follows.
Good enough for building sentence pairs; it is not a linguistic parser. Measured against pysbd on the
shared books in BENCHMARKS.md (``scripts/compare_splitters.py``).

Abbreviations are matched with their case (version 2 of the splitter; ``SPLITTER_VERSION`` is part of the
corpus stage's fingerprint): matched case-insensitively, ordinary words that end a sentence were taken
for abbreviations -- "I said no. Then I left." ("No." = number), "She sat. He stood." ("Sat." =
Saturday), "They watched the sun. Then it set." -- and the sentences were not split.
"""

from __future__ import annotations

import re

SPLITTER_VERSION = 2

# Titles, names of months and days, and other abbreviations written capitalised ("Mr.", "St.", "Sat.").
CAPITALISED = frozenset(
    ["Mr", "Mrs", "Ms", "Messrs", "Mme", "Mlle", "Dr", "Prof", "Rev", "Revd", "Fr", "Hon", "St", "Ste", "Mt", "Ft", "Jr", "Sr", "Gen", "Col", "Capt", "Cpt", "Lt", "Sgt", "Maj", "Adm", "Cmdr", "Gov", "Pres", "Supt", "Insp", "Esq", "Sen", "Rep", "Inc", "Ltd", "Co", "Corp", "Bros", "Dept", "Univ", "Assn", "Ave", "Blvd", "Rd", "Jan", "Feb", "Mar", "Apr", "Jun", "Jul", "Aug", "Sep", "Sept", "Oct", "Nov", "Dec", "Mon", "Tue", "Tues", "Wed", "Thu", "Thur", "Thurs", "Fri", "Sat", "Sun", "U.S", "U.K", "B.C", "A.D", "A.M", "P.M"]
)
# Of those, the ones also written in capitals in all-caps text ("MR. HOLMES"): not months and days ("SUN.").
ALL_CAPS = frozenset(w.upper() for w in ["Mr", "Mrs", "Ms", "Messrs", "Dr", "Prof", "Rev", "St", "Mt", "Jr", "Sr", "Gen", "Col", "Capt", "Lt", "Sgt", "Maj", "Gov", "Esq", "Co", "Ltd", "Inc", "Corp", "Bros"])
# Written in lower case; also capitalised at the start of a sentence ("Cf.", "E.g.").
LOWER = frozenset(["vs", "etc", "e.g", "i.e", "viz", "cf", "approx", "vol", "vols", "ch", "chap", "fig", "figs", "pp"])
# Lower case only: capitalised they are names or words ("Al", "Ed", "Ca").
LOWER_ONLY = frozenset(["al", "ca", "ed", "eds", "p", "a.m", "p.m"])
# "No." / "Nos." abbreviate "number" only before a number ("No. 5"); otherwise it is the word "no".
NUMBER_SIGNS = frozenset(["No", "no", "NO", "Nos", "nos"])
# The version-1 list (case-insensitive), kept for reference and for the comparison script.
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
            if _is_abbreviation(text, rev, m.start(1), m.end()):
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


def _is_abbreviation(text: str, rev: str, period_pos: int, next_pos: int) -> bool:
    """Is the word just before ``text[period_pos]`` (at most 32 characters of ``[\\w.'-]``) an abbreviation
    or an initial? ``next_pos``: where the next sentence would start."""
    m = _WORD_REV.match(rev, len(text) - period_pos)
    if not m:
        return False
    n = min(m.end() - m.start(), 32)
    word = text[period_pos - n: period_pos].lstrip("'\"(")
    if len(word) == 1:
        return word.isupper() and word != "I"  # an initial ("J. Smith"), not the pronoun ("said I. Then")
    if word in CAPITALISED or word in LOWER or word in LOWER_ONLY or word in ALL_CAPS:
        return True
    if word[:1].isupper() and word[1:].islower() and word.lower() in LOWER:  # "Cf.", "Vol."
        return True
    if word.rstrip(".") in CAPITALISED or word.rstrip(".") in LOWER:  # "U.S..", "etc.."
        return True
    return word in NUMBER_SIGNS and text[next_pos: next_pos + 1].isdigit()
