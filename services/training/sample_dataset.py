"""The sample dataset: short, true instruction records made by a seeded generator.

`datasets/sample.jsonl` is this module's output; a test keeps the file and the generator equal.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from services.core.atomic import write_bytes_atomic

SAMPLE_DATASET_ID = "sample"
RECORDS_PER_TASK = 24

Record = dict[str, str]
Task = Callable[[random.Random], Record]

WORDS = (
    "apple", "banana", "garden", "river", "window", "pencil", "rocket", "silver", "planet",
    "forest", "candle", "bridge", "orange", "yellow", "market", "summer", "winter", "castle",
    "dragon", "butter", "violin", "island", "jacket", "ladder", "mirror", "needle", "pepper",
    "rabbit", "saddle", "tunnel", "basket", "cloud", "stone", "music", "light", "table",
    "chair", "horse", "train", "bread", "water", "lemon", "tiger", "zebra", "ocean", "paper",
    "glass", "honey", "piano", "robot",
)  # fmt: skip

# nouns whose plural follows the regular spelling rules below (no "child", "mouse", "leaf")
NOUNS = (
    "book", "tree", "car", "dog", "cat", "bird", "door", "lamp", "river", "cloud", "apple",
    "garden", "pencil", "table", "chair", "house", "road", "flower", "cup", "shoe", "box",
    "fox", "bus", "glass", "dish", "brush", "watch", "bench", "church", "city", "baby", "story",
    "party", "lady", "day", "key", "toy", "boy", "valley", "monkey", "girl", "hand", "ship",
)  # fmt: skip

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

SUBJECTS = (
    "the cat", "my brother", "the teacher", "a small bird", "the old man", "our team",
    "the girl", "the farmer", "my friend", "the baker",
)  # fmt: skip
VERBS = ("sees", "likes", "finds", "paints", "reads about", "waits for", "helps", "follows")
OBJECTS = (
    "the red ball", "a tall tree", "the blue door", "the river", "a quiet town", "the moon",
    "a green apple", "the new bike", "the yellow house", "a funny dog",
)  # fmt: skip

VOWELS = "aeiou"


def plural(noun: str) -> str:
    """The regular English plural: -es after s/x/ch/sh, -ies after a consonant + y, else -s."""
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in VOWELS:
        return noun[:-1] + "ies"
    return noun + "s"


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}".capitalize() + "."


def _amount(count: int, unit: str) -> str:
    """`1 meter`, `2 meters`: the sample's answers must be good English too."""
    return f"{count} {unit}" if count == 1 else f"{count} {unit}s"


def _record(instruction: str, output: str, input_text: str | None = None) -> Record:
    # fixed key order: the file's bytes depend on it
    if input_text is None:
        return {"instruction": instruction, "output": output}
    return {"instruction": instruction, "input": input_text, "output": output}


def _add(rng: random.Random) -> Record:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        return _record(f"What is {a} + {b}?", str(a + b))
    return _record("Add the two numbers.", str(a + b), f"{a} and {b}")


def _subtract(rng: random.Random) -> Record:
    a, b = rng.randint(10, 99), rng.randint(0, 60)
    if rng.random() < 0.5:
        return _record(f"What is {a} - {b}?", str(a - b))
    return _record(f"Subtract {b} from {a}.", str(a - b))


def _multiply(rng: random.Random) -> Record:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    if rng.random() < 0.5:
        return _record(f"What is {a} times {b}?", str(a * b))
    return _record("Multiply the two numbers.", str(a * b), f"{a} x {b}")


def _compare(rng: random.Random) -> Record:
    a, b = rng.sample(range(1, 200), 2)
    if rng.random() < 0.5:
        return _record(f"Which number is larger, {a} or {b}?", str(max(a, b)))
    return _record(f"Which number is smaller, {a} or {b}?", str(min(a, b)))


def _sort(rng: random.Random) -> Record:
    numbers = rng.sample(range(1, 60), rng.randint(3, 6))
    listed = ", ".join(map(str, numbers))
    if rng.random() < 0.5:
        answer = ", ".join(map(str, sorted(numbers)))
        return _record("Sort these numbers from smallest to largest.", answer, listed)
    answer = ", ".join(map(str, sorted(numbers, reverse=True)))
    return _record("Sort these numbers from largest to smallest.", answer, listed)


def _reverse(rng: random.Random) -> Record:
    word = rng.choice(WORDS)
    return _record("Reverse the letters of the word.", word[::-1], word)


def _spell(rng: random.Random) -> Record:
    word = rng.choice(WORDS)
    return _record(f'Spell the word "{word}" letter by letter.', "-".join(word))


def _count_letters(rng: random.Random) -> Record:
    word = rng.choice(WORDS)
    return _record(f'How many letters are in the word "{word}"?', str(len(word)))


def _count_vowels(rng: random.Random) -> Record:
    word = rng.choice(WORDS)
    count = sum(letter in VOWELS for letter in word)
    return _record("Count the vowels (a, e, i, o, u) in the word.", str(count), word)


def _convert_length(rng: random.Random) -> Record:
    kind = rng.randrange(3)
    if kind == 0:
        meters = rng.randint(1, 50)
        question = f"Convert {_amount(meters, 'meter')} to centimeters."
        return _record(question, _amount(meters * 100, "centimeter"))
    if kind == 1:
        km = rng.randint(1, 30)
        return _record(
            f"Convert {_amount(km, 'kilometer')} to meters.", _amount(km * 1000, "meter")
        )
    cm = rng.randint(1, 40) * 100
    return _record(f"Convert {cm} centimeters to meters.", _amount(cm // 100, "meter"))


def _convert_time(rng: random.Random) -> Record:
    kind = rng.randrange(3)
    if kind == 0:
        hours = rng.randint(1, 24)
        return _record(
            f"How many minutes are in {_amount(hours, 'hour')}?", f"{hours * 60} minutes"
        )
    if kind == 1:
        minutes = rng.randint(1, 30)
        question = f"How many seconds are in {_amount(minutes, 'minute')}?"
        return _record(question, f"{minutes * 60} seconds")
    minutes = rng.randint(1, 12) * 60
    return _record(f"Convert {minutes} minutes to hours.", _amount(minutes // 60, "hour"))


def _parity(rng: random.Random) -> Record:
    n = rng.randint(0, 999)
    answer = "even" if n % 2 == 0 else "odd"
    if rng.random() < 0.5:
        return _record(f"Is {n} even or odd?", answer)
    return _record("Say whether the number is even or odd.", answer, str(n))


def _uppercase(rng: random.Random) -> Record:
    sentence = _sentence(rng)
    return _record("Rewrite the sentence in uppercase.", sentence.upper(), sentence)


def _plural(rng: random.Random) -> Record:
    noun = rng.choice(NOUNS)
    return _record(f'What is the plural of "{noun}"?', plural(noun))


def _weekday(rng: random.Random) -> Record:
    start, step = rng.randrange(7), rng.randint(1, 10)
    if rng.random() < 0.5:
        day = DAYS[(start + step) % 7]
        return _record(f"What day is {_amount(step, 'day')} after {DAYS[start]}?", day)
    day = DAYS[(start - step) % 7]
    return _record(f"What day was {_amount(step, 'day')} before {DAYS[start]}?", day)


TASKS: tuple[Task, ...] = (
    _add, _subtract, _multiply, _compare, _sort, _reverse, _spell, _count_letters,
    _count_vowels, _convert_length, _convert_time, _parity, _uppercase, _plural, _weekday,
)  # fmt: skip


def generate_sample_records(seed: int = 0) -> list[Record]:
    """`RECORDS_PER_TASK` distinct records per task, interleaved in a seeded order."""
    rng = random.Random(seed)
    records: list[Record] = []
    for task in TASKS:
        seen: set[tuple[str, ...]] = set()
        # a task with few distinct records (e.g. 50 words) must not loop forever
        for _ in range(RECORDS_PER_TASK * 50):
            if len(seen) == RECORDS_PER_TASK:
                break
            record = task(rng)
            key = tuple(record.values())
            if key not in seen:
                seen.add(key)
                records.append(record)
    rng.shuffle(records)
    return records


def sample_dataset_bytes(seed: int = 0) -> bytes:
    """The JSON Lines form: one object a line, keys in generator order, UTF-8."""
    lines = (json.dumps(record, ensure_ascii=False) for record in generate_sample_records(seed))
    return "".join(line + "\n" for line in lines).encode()


def write_sample_dataset(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, sample_dataset_bytes())


if __name__ == "__main__":
    write_sample_dataset(Path(__file__).resolve().parents[2] / "datasets" / "sample.jsonl")
