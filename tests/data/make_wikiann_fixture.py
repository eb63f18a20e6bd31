"""Write the tests' own small WikiANN-like corpus: tests/data/wikiann/<lang>/{train,dev,test}.

    python tests/data/make_wikiann_fixture.py        # rewrites the committed files, byte for byte

Synthetic, not an excerpt: sentences are drawn (fixed seed) from a few templates per language
and short lists of person, place and organisation names, so the fixture carries no third-party
text and no licence beyond this repository's. It has the PAN-X layout of the real corpus
(`lang:token<TAB>tag`, IOB2 over PER/ORG/LOC, a blank line between sentences) and what the tests
exercise: every tag, one- and several-word entities, sentences of 3 to ~20 words, all six
languages. It is far too small and regular to say anything about NER quality; the experiments
read the real corpus (README: The data).
"""

import random
from pathlib import Path

LANGS = ("en", "de", "es", "fr", "nl", "pt")
SIZES = {"train": 120, "dev": 60, "test": 60}   # sentences per language and split: the tests read <= 100
OUT = Path(__file__).resolve().parent / "wikiann"

PER = ["Maria Silva", "John Smith", "Anna", "Pieter de Vries", "Jean Dupont", "Hans Müller", "Carlos Ruiz",
       "Sofia", "Emma van Dijk", "Luís Costa", "Claire Martin", "Klaus"]
LOC = ["Paris", "Berlin", "Lisboa", "Amsterdam", "Madrid", "New York", "Rio de Janeiro", "Lyon", "Utrecht",
       "Sevilla", "Hamburg", "Porto", "Buenos Aires"]
ORG = ["Siemens", "Banco do Brasil", "Ajax", "Real Madrid", "United Nations", "Deutsche Bahn", "Renault",
       "Philips", "Universidad de Chile", "BBC"]

# Templates per language: {PER}, {LOC}, {ORG} are entity slots; every other word is O.
TEMPLATES = {
    "en": ["{PER} was born in {LOC} .", "{PER} works for {ORG} in {LOC} .", "{ORG}", "{LOC} , {LOC}",
           "The {ORG} team played in {LOC} last year .", "He moved to {LOC} with {PER} .",
           "See also : {ORG} and {ORG}"],
    "de": ["{PER} wurde in {LOC} geboren .", "{PER} arbeitet bei {ORG} in {LOC} .", "{ORG}", "{LOC} , {LOC}",
           "Die Mannschaft von {ORG} spielte in {LOC} .", "Er zog mit {PER} nach {LOC} .",
           "Siehe auch : {ORG} und {ORG}"],
    "es": ["{PER} nació en {LOC} .", "{PER} trabaja para {ORG} en {LOC} .", "{ORG}", "{LOC} , {LOC}",
           "El equipo de {ORG} jugó en {LOC} el año pasado .", "Se mudó a {LOC} con {PER} .",
           "Véase también : {ORG} y {ORG}"],
    "fr": ["{PER} est né à {LOC} .", "{PER} travaille pour {ORG} à {LOC} .", "{ORG}", "{LOC} , {LOC}",
           "L' équipe de {ORG} a joué à {LOC} l' an dernier .", "Il a déménagé à {LOC} avec {PER} .",
           "Voir aussi : {ORG} et {ORG}"],
    "nl": ["{PER} werd geboren in {LOC} .", "{PER} werkt voor {ORG} in {LOC} .", "{ORG}", "{LOC} , {LOC}",
           "Het team van {ORG} speelde vorig jaar in {LOC} .", "Hij verhuisde met {PER} naar {LOC} .",
           "Zie ook : {ORG} en {ORG}"],
    "pt": ["{PER} nasceu em {LOC} .", "{PER} trabalha para {ORG} em {LOC} .", "{ORG}", "{LOC} , {LOC}",
           "A equipe do {ORG} jogou em {LOC} no ano passado .", "Mudou-se para {LOC} com {PER} .",
           "Ver também : {ORG} e {ORG}"],
}
NAMES = {"PER": PER, "LOC": LOC, "ORG": ORG}


def sentence(template, rng):
    """(token, tag) pairs of one filled-in template, IOB2."""
    pairs = []
    for word in template.split():
        if word.startswith("{") and word.endswith("}"):
            kind = word[1:-1]
            for i, token in enumerate(rng.choice(NAMES[kind]).split()):
                pairs.append((token, ("B-" if i == 0 else "I-") + kind))
        else:
            pairs.append((word, "O"))
    return pairs


def write(lang, split, n, rng):
    lines = []
    for _ in range(n):
        lines += [f"{lang}:{token}\t{tag}" for token, tag in sentence(rng.choice(TEMPLATES[lang]), rng)] + [""]
    path = OUT / lang / split
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")   # ends in a blank line, as PAN-X does


def main():
    for lang in LANGS:
        for split, n in SIZES.items():
            # one stream per file: changing one size leaves the other files as they are
            write(lang, split, n, random.Random(f"{lang}-{split}"))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
