"""The embedded demo corpus: short encyclopedia-style documents about countries, generated offline.

``distilflow pipeline`` uses it when no ``--input`` is given, so the first README command works on a
fresh machine without any download. The facts (capital, continent, language, currency, a river or
landmark) are written here by hand; each country gets several documents built from varied sentence
templates, so a tiny model can learn e.g. "Paris is the capital of [MASK]." within minutes on a CPU.
It is a smoke-test corpus, not a language-modelling benchmark: use ``--input`` for real text.
"""

from __future__ import annotations

import os

import numpy as np

# country, capital, continent, language, currency, landmark
FACTS: list[tuple[str, str, str, str, str, str]] = [
    ("France", "Paris", "Europe", "French", "euro", "the Seine"),
    ("Germany", "Berlin", "Europe", "German", "euro", "the Rhine"),
    ("Italy", "Rome", "Europe", "Italian", "euro", "the Tiber"),
    ("Spain", "Madrid", "Europe", "Spanish", "euro", "the Tagus"),
    ("Portugal", "Lisbon", "Europe", "Portuguese", "euro", "the Douro"),
    ("Austria", "Vienna", "Europe", "German", "euro", "the Danube"),
    ("Hungary", "Budapest", "Europe", "Hungarian", "forint", "the Danube"),
    ("Poland", "Warsaw", "Europe", "Polish", "zloty", "the Vistula"),
    ("Sweden", "Stockholm", "Europe", "Swedish", "krona", "the Baltic Sea"),
    ("Norway", "Oslo", "Europe", "Norwegian", "krone", "the fjords"),
    ("Denmark", "Copenhagen", "Europe", "Danish", "krone", "the North Sea"),
    ("Finland", "Helsinki", "Europe", "Finnish", "euro", "the lakes"),
    ("Greece", "Athens", "Europe", "Greek", "euro", "the Aegean Sea"),
    ("Ireland", "Dublin", "Europe", "Irish", "euro", "the Liffey"),
    ("England", "London", "Europe", "English", "pound", "the Thames"),
    ("Russia", "Moscow", "Europe", "Russian", "rouble", "the Volga"),
    ("Egypt", "Cairo", "Africa", "Arabic", "pound", "the Nile"),
    ("Kenya", "Nairobi", "Africa", "Swahili", "shilling", "Mount Kenya"),
    ("Nigeria", "Abuja", "Africa", "English", "naira", "the Niger"),
    ("Ghana", "Accra", "Africa", "English", "cedi", "the Volta"),
    ("Morocco", "Rabat", "Africa", "Arabic", "dirham", "the Atlas Mountains"),
    ("Ethiopia", "Addis Ababa", "Africa", "Amharic", "birr", "the Blue Nile"),
    ("Japan", "Tokyo", "Asia", "Japanese", "yen", "Mount Fuji"),
    ("China", "Beijing", "Asia", "Chinese", "yuan", "the Yangtze"),
    ("India", "Delhi", "Asia", "Hindi", "rupee", "the Ganges"),
    ("Thailand", "Bangkok", "Asia", "Thai", "baht", "the Chao Phraya"),
    ("Vietnam", "Hanoi", "Asia", "Vietnamese", "dong", "the Mekong"),
    ("Korea", "Seoul", "Asia", "Korean", "won", "the Han River"),
    ("Iran", "Tehran", "Asia", "Persian", "rial", "the Zagros Mountains"),
    ("Turkey", "Ankara", "Asia", "Turkish", "lira", "the Bosphorus"),
    ("Canada", "Ottawa", "America", "English", "dollar", "the Saint Lawrence"),
    ("Mexico", "Mexico City", "America", "Spanish", "peso", "the Sierra Madre"),
    ("Brazil", "Brasilia", "America", "Portuguese", "real", "the Amazon"),
    ("Argentina", "Buenos Aires", "America", "Spanish", "peso", "the Andes"),
    ("Peru", "Lima", "America", "Spanish", "sol", "Lake Titicaca"),
    ("Chile", "Santiago", "America", "Spanish", "peso", "the Atacama Desert"),
    ("Cuba", "Havana", "America", "Spanish", "peso", "the Caribbean Sea"),
    ("Australia", "Canberra", "Oceania", "English", "dollar", "the Great Barrier Reef"),
]

TEMPLATES = [
    "{capital} is the capital of {country}.",
    "The capital of {country} is {capital}.",
    "{country} is a country in {continent}.",
    "People in {country} speak {language}.",
    "The official language of {country} is {language}.",
    "The currency of {country} is the {currency}.",
    "In {country} you pay with the {currency}.",
    "{capital} is the largest city of {country}.",
    "Many visitors to {country} go to see {landmark}.",
    "{landmark} is one of the best known sights of {country}.",
    "The government of {country} meets in {capital}.",
    "Most people in {capital} speak {language}.",
    "{country} lies in {continent} and its capital is {capital}.",
]


def demo_documents(n_docs_per_country: int = 12, seed: int = 0) -> list[str]:
    """Documents of 4-8 sentences each (templates in random order), as plain-text paragraphs."""
    rng = np.random.default_rng(seed)
    docs: list[str] = []
    for _ in range(n_docs_per_country):
        for country, capital, continent, language, currency, landmark in FACTS:
            k = int(rng.integers(4, 9))
            picks = rng.choice(len(TEMPLATES), size=k, replace=False)
            fields = {"country": country, "capital": capital, "continent": continent, "language": language,
                      "currency": currency, "landmark": landmark}
            docs.append(" ".join(TEMPLATES[int(i)].format(**fields) for i in picks))
    order = rng.permutation(len(docs))
    return [docs[int(i)] for i in order]


def write_demo_corpus(folder: str, seed: int = 0) -> tuple[list[str], list[str]]:
    """Write ``train-*.txt`` and ``heldout.txt`` (blank line between documents); returns (train, heldout)."""
    os.makedirs(folder, exist_ok=True)
    docs = demo_documents(seed=seed)
    heldout, train = docs[: len(docs) // 10], docs[len(docs) // 10:]
    half = len(train) // 2
    paths = []
    for i, chunk in enumerate((train[:half], train[half:])):
        p = os.path.join(folder, f"train-{i}.txt")
        _write(p, chunk)
        paths.append(p)
    h = os.path.join(folder, "heldout.txt")
    _write(h, heldout)
    return paths, [h]


def _write(path: str, docs: list[str]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n\n".join(docs) + "\n")
    os.replace(tmp, path)
