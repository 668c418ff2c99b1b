"""Seeded generator for the sample task datasets.

    python -m studio.samples.generate [--out DIR] [--seed N]

writes ``<out>/<task>/train.jsonl`` and ``<out>/<task>/eval.jsonl`` for every task in
``studio.samples.SAMPLE_TASKS`` (default out: ``assets/samples``). The same seed always gives
byte-identical files: each task draws from its own ``random.Random(f"{seed}:{name}")``, so adding a
task never reshuffles the others, and files are written as UTF-8 with ``\\n`` line endings.

Each task's example maker is one function ``(rng) -> (input, output)`` in ``MAKERS``;
``split_unique`` draws from it until both splits are full, never reusing an input, so no eval input
is ever seen in training. Standard library only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from collections.abc import Callable
from pathlib import Path

from studio.samples import EVAL_SIZE, SAMPLE_TASKS, TRAIN_SIZE, samples_dir

DEFAULT_SEED = 1234

Maker = Callable[[random.Random], tuple[str, str]]

# --- dates ---------------------------------------------------------------------------------------

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
MONTH_ABBR = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
FIRST_DATE = dt.date(1950, 1, 1)
LAST_DATE = dt.date(2035, 12, 31)


def ordinal(n: int) -> str:
    """1 -> '1st', 2 -> '2nd', 11 -> '11th', 23 -> '23rd'."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# Every style names the month in words and the year in four digits, so none is ambiguous.
DATE_STYLES: tuple[Callable[[dt.date], str], ...] = (
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",                  # March 5, 2021
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",                   # 5 March 2021
    lambda d: f"{MONTH_ABBR[d.month - 1]} {ordinal(d.day)}, {d.year}",     # Mar 5th, 2021
    lambda d: f"the {ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",  # the 5th of March, 2021
    lambda d: f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.year} {MONTHS[d.month - 1]} {d.day:02d}",               # 2021 March 05
    lambda d: f"{d.day} {MONTH_ABBR[d.month - 1]} {d.year}",               # 5 Mar 2021
    lambda d: f"{MONTHS[d.month - 1]} {ordinal(d.day)}, {d.year}",         # March 5th, 2021
    lambda d: f"{WEEKDAYS[d.weekday()]} {d.day} {MONTHS[d.month - 1]} {d.year}",
)


def make_date(rng: random.Random) -> tuple[str, str]:
    day = dt.date.fromordinal(rng.randint(FIRST_DATE.toordinal(), LAST_DATE.toordinal()))
    style = rng.choice(DATE_STYLES)
    return style(day), day.isoformat()


# --- json_fields ---------------------------------------------------------------------------------

NAMES = ("Maria", "James", "Aisha", "Kenji", "Sofia", "Liam", "Priya", "Omar", "Elena", "Noah",
         "Fatima", "Lucas", "Mei", "Daniel", "Amara", "Hugo", "Ingrid", "Mateo", "Yuki", "Grace",
         "Tariq", "Chloé", "Pavel", "Nadia", "Diego", "Hannah", "Kwame", "Lena", "Rafael", "Zoe",
         "Arjun", "Beatriz", "Felix", "Leila", "Tomás", "Olga", "Samuel", "Ines", "Ravi", "Clara",
         "José", "Anika", "Marco", "Sara", "Viktor", "Nora", "Emeka", "Julia")
CITIES = ("Lisbon", "Tokyo", "Nairobi", "Berlin", "Toronto", "Mumbai", "Cairo", "Madrid",
          "Oslo", "Seoul", "Lima", "Dublin", "Sydney", "Chicago", "Prague", "Accra", "Hanoi",
          "Vienna", "New York", "Buenos Aires", "Cape Town", "São Paulo", "Kraków", "Zürich",
          "Montreal", "Manila", "Athens", "Denver", "Osaka", "Bogotá", "Helsinki", "Lagos",
          "Rome", "Austin", "Istanbul", "Glasgow", "Porto", "Mexico City", "Tunis", "Perth")
PERSON_TEMPLATES = (
    "{name} is {age} and lives in {city}.",
    "{city} is home to {name}, who is {age} years old.",
    "{name}, {age}, lives in {city}.",
    "{name} is a {age}-year-old living in {city}.",
    "{age}-year-old {name} lives in {city}.",
    "Meet {name}: {age} years old and based in {city}.",
    "{name} lives in {city} and just turned {age}.",
    "Living in {city}, {name} is {age} years old.",
    "{name} ({age}) lives in {city}.",
    "At {age}, {name} calls {city} home.",
    "{name} from {city} is {age} years old.",
    "In {city} lives {name}, aged {age}.",
    # Three with a distracting second number, always below 18 so it can never be the age.
    "{name} has lived in {city} for {years} years and is now {age}.",
    "{name} is {age}, has {kids} kids, and lives in {city}.",
    "{name}, who lives in {city}, celebrated turning {age} with {kids} friends.",
)


def make_person(rng: random.Random) -> tuple[str, str]:
    name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 89)
    template, years, kids = rng.choice(PERSON_TEMPLATES), rng.randint(2, 15), rng.randint(2, 9)
    text = template.format(name=name, age=age, city=city, years=years, kids=kids)
    answer = json.dumps({"name": name, "age": age, "city": city}, ensure_ascii=False)
    return text, answer


# --- sentiment -----------------------------------------------------------------------------------

PRODUCTS = ("the headset", "this blender", "the backpack", "this phone case", "the desk lamp",
            "the coffee maker", "this keyboard", "the vacuum cleaner", "the water bottle",
            "this charger", "the office chair", "the rice cooker", "this tent", "the smartwatch")
DISHES = ("the pasta", "the service", "the pizza", "the wine", "the soup", "the bread",
          "the burger", "the brunch", "the curry", "the dessert", "the sushi", "the coffee",
          "the steak", "the salad")
POSITIVE_WORDS = ("excellent", "fantastic", "wonderful", "superb", "amazing", "outstanding",
                  "great", "lovely", "perfect", "impressive")
NEGATIVE_WORDS = ("terrible", "awful", "disappointing", "horrible", "dreadful", "poor",
                  "subpar", "unacceptable", "bad", "frustrating")
# The only negations are ones whose polarity nobody would dispute ("not bad at all, actually
# great"), and every review ends with a closer of the same polarity.
CLAUSES = {
    "positive": ("{S} was {a}.", "{S} was absolutely {a}.", "I loved {s}, it was {a}.",
                 "{S} was not bad at all, actually {a}.", "Honestly, {s} was {a}.",
                 "{S} was {a} and {b}."),
    "negative": ("{S} was {a}.", "{S} was really {a}.", "I hated {s}, it was {a}.",
                 "{S} was not good at all, just {a}.", "Honestly, {s} was {a}.",
                 "{S} was {a} and {b}."),
}
CLOSERS = {
    ("product", "positive"): ("Would buy again.", "Worth every penny.", "Highly recommend it.",
                              "Five stars.", "Exactly what I needed.", "Could not be happier."),
    ("product", "negative"): ("Would not buy again.", "Total waste of money.", "One star.",
                              "Do not recommend it.", "Returning it tomorrow.",
                              "Not worth the price."),
    ("restaurant", "positive"): ("We will definitely be back.", "Highly recommend this place.",
                                 "Five stars.", "Best meal in weeks.", "Could not be happier."),
    ("restaurant", "negative"): ("We will not be back.", "Avoid this place.", "One star.",
                                 "Worst meal in weeks.", "Not worth the price."),
}
SENTIMENT_LABELS = ("positive", "negative")


def make_review(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(SENTIMENT_LABELS)
    domain = rng.choice(("product", "restaurant"))
    subject = rng.choice(PRODUCTS if domain == "product" else DISHES)
    words = POSITIVE_WORDS if label == "positive" else NEGATIVE_WORDS
    first, second = rng.sample(words, 2)
    clause = rng.choice(CLAUSES[label]).format(
        S=subject[0].upper() + subject[1:], s=subject, a=first, b=second
    )
    return f"{clause} {rng.choice(CLOSERS[(domain, label)])}", label


# --- splitting and writing -----------------------------------------------------------------------

MAKERS: dict[str, Maker] = {"dates": make_date, "json_fields": make_person, "sentiment": make_review}
# Tasks whose outputs are a fixed label set: each split gets an equal share of every label.
LABELS: dict[str, tuple[str, ...]] = {"sentiment": SENTIMENT_LABELS}


def _quotas(size: int, labels: tuple[str, ...] | None) -> dict[str | None, int]:
    if not labels:
        return {None: size}
    share, extra = divmod(size, len(labels))
    return {label: share + (i < extra) for i, label in enumerate(labels)}


def split_unique(
    maker: Maker,
    rng: random.Random,
    n_train: int = TRAIN_SIZE,
    n_eval: int = EVAL_SIZE,
    labels: tuple[str, ...] | None = None,
    max_draws: int = 200_000,
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Draw ``(input, output)`` pairs until the eval and train splits are full.

    An input is used at most once across both splits (later repeats are discarded), so train and
    eval never share an input and neither split holds one twice. With ``labels``, each split takes
    an equal quota of every label and a pair whose label's quota is already full is discarded.
    """
    want = {"eval": _quotas(n_eval, labels), "train": _quotas(n_train, labels)}
    out: dict[str, list[tuple[str, str]]] = {"eval": [], "train": []}
    seen: set[str] = set()
    for _ in range(max_draws):
        if all(n == 0 for quota in want.values() for n in quota.values()):
            return out["train"], out["eval"]
        text, answer = maker(rng)
        if text in seen:
            continue
        seen.add(text)
        key = answer if labels else None
        if labels and answer not in labels:
            raise ValueError(f"maker returned label {answer!r}, not one of {labels}")
        for split in ("eval", "train"):
            if want[split][key] > 0:
                want[split][key] -= 1
                out[split].append((text, answer))
                break
    raise RuntimeError(f"could not draw {n_train} + {n_eval} distinct inputs in {max_draws} tries")


def build_task(name: str, seed: int = DEFAULT_SEED) -> dict[str, list[dict]]:
    """The ``{"train": rows, "eval": rows}`` of one task for a seed."""
    task = SAMPLE_TASKS[name]
    rng = random.Random(f"{seed}:{name}")
    train, evals = split_unique(MAKERS[name], rng, labels=LABELS.get(name))

    def rows(pairs: list[tuple[str, str]]) -> list[dict]:
        return [{"instruction": task.instruction, "input": i, "output": o} for i, o in pairs]

    return {"train": rows(train), "eval": rows(evals)}


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_all(out_dir: Path | str | None = None, seed: int = DEFAULT_SEED) -> list[Path]:
    """Write every task's ``train.jsonl`` and ``eval.jsonl`` under ``out_dir``; return the paths."""
    out = Path(out_dir) if out_dir is not None else samples_dir()
    written = []
    for name in SAMPLE_TASKS:
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, rows in build_task(name, seed).items():
            path = folder / f"{split}.jsonl"
            with path.open("w", encoding="utf-8", newline="\n") as handle:
                handle.write(to_jsonl(rows))
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m studio.samples.generate", description="Write the sample task datasets."
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (assets/samples)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed ({DEFAULT_SEED})")
    args = parser.parse_args(argv)
    for path in write_all(args.out, args.seed):
        with path.open(encoding="utf-8") as handle:
            print(f"{path}  ({sum(1 for _ in handle)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
