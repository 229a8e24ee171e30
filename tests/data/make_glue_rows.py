"""Write the generated GLUE-format rows of tests/data (SST-2, CoLA, STS-B, MRPC): ``python make_glue_rows.py``.

The GLUE files carry no clear licence for redistribution, so the tests ship generated sentences in exactly
the distributed layouts instead: SST-2's ``sentence<TAB>label`` header, CoLA's four headerless columns
(source, label, original judgement, sentence), STS-B's ten-column header with a float ``score``, and MRPC's
header behind a UTF-8 byte-order mark (the real MRPC files begin with one). Deterministic (seed 0).
"""

from __future__ import annotations

import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
POSITIVE = ["charming", "moving", "clever", "warm", "gripping", "funny", "tender", "bold", "graceful", "lively"]
NEGATIVE = ["dull", "clumsy", "tedious", "shallow", "bleak", "messy", "lifeless", "stale", "hollow", "tiresome"]
THINGS = ["film", "story", "performance", "script", "journey", "comedy", "drama", "ending", "cast", "score"]
PEOPLE = ["man", "woman", "child", "dog", "girl", "boy", "chef", "pilot", "teacher", "farmer"]
ACTIONS = [("playing a guitar", "playing an instrument"), ("riding a horse", "riding an animal"),
           ("cutting an onion", "slicing an onion"), ("reading a book", "reading a novel"),
           ("running on a beach", "jogging on the sand"), ("cooking dinner", "making a meal"),
           ("painting a wall", "painting a fence"), ("swimming in a lake", "swimming in a pool")]
VERBS = ["saw", "liked", "found", "kept", "sold", "painted", "chased", "moved"]


def _write(path: Path, lines: list[str], bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")


def sst2(rng: random.Random, n: int) -> list[str]:
    rows = ["sentence\tlabel"]
    for _ in range(n):
        label = rng.randint(0, 1)
        words = POSITIVE if label else NEGATIVE
        a, b = rng.sample(words, 2)
        rows.append(f"a {a} and {b} {rng.choice(THINGS)} . \t{label}")
    return rows


def cola(rng: random.Random, n: int) -> list[str]:
    rows = []
    for _ in range(n):
        subject, obj = rng.sample(PEOPLE, 2)
        verb = rng.choice(VERBS)
        if rng.random() < 0.7:
            rows.append(f"gen0{rng.randint(1, 3)}\t1\t\tThe {subject} {verb} the {obj}.")
        else:
            rows.append(f"gen0{rng.randint(1, 3)}\t0\t*\t{subject.capitalize()} the {verb} the {obj}.")
    return rows


def _pair(rng: random.Random) -> tuple[str, str, float]:
    person, other = rng.sample(PEOPLE, 2)
    (act, paraphrase), (other_act, _) = rng.sample(ACTIONS, 2)
    first = f"A {person} is {act}."
    second, score = rng.choice([(f"A {person} is {paraphrase}.", 4.6), (f"The {person} is {act}.", 5.0),
                                (f"A {other} is {act}.", 2.4), (f"A {person} is {other_act}.", 1.2),
                                (f"A {other} is {other_act}.", 0.0)])
    return first, second, round(score - rng.random() * 0.4 * (score > 0), 3)


def stsb(rng: random.Random, n: int, split: str) -> list[str]:
    rows = ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"]
    for i in range(n):
        first, second, score = _pair(rng)
        rows.append(f"{i}\tmain-captions\tGENvid\t2026{split}\t{i:04d}\tnone\tnone\t{first}\t{second}\t{score:.3f}")
    return rows


def mrpc(rng: random.Random, n: int) -> list[str]:
    rows = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
    for i in range(n):
        first, second, score = _pair(rng)
        rows.append(f"{int(score >= 2.5)}\t{1000 + 2 * i}\t{1001 + 2 * i}\t{first}\t{second}")
    return rows


def main() -> None:
    rng = random.Random(0)
    _write(HERE / "glue" / "SST-2" / "train.tsv", sst2(rng, 64))
    _write(HERE / "glue" / "SST-2" / "dev.tsv", sst2(rng, 24))
    _write(HERE / "glue" / "CoLA" / "train.tsv", cola(rng, 80))
    _write(HERE / "glue" / "CoLA" / "dev.tsv", cola(rng, 24))
    _write(HERE / "glue" / "STS-B" / "train.tsv", stsb(rng, 64, "train"))
    _write(HERE / "glue" / "STS-B" / "dev.tsv", stsb(rng, 24, "dev"))
    _write(HERE / "glue" / "MRPC" / "train.tsv", mrpc(rng, 64), bom=True)
    _write(HERE / "glue" / "MRPC" / "dev.tsv", mrpc(rng, 16), bom=True)


if __name__ == "__main__":
    main()
