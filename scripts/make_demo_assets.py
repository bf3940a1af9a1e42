"""Generate the embedded demo assets: a small alpaca-style dataset, a SentencePiece tokenizer trained on it, and
preference pairs (a right and a wrong answer) from the same tasks.

Regenerate (deterministic, idempotent: the same bytes every run) from the repository root with

    python scripts/make_demo_assets.py            # writes mytune/assets/demo/{alpaca_demo.jsonl,tokenizer.model,
                                                  #                           preference_demo.jsonl}
    python scripts/make_demo_assets.py --preference-only    # only preference_demo.jsonl

The rows are short, template-written tasks (reverse words, sort or add numbers, capitals, plurals, opposites, ...)
that a ~1M-parameter model can learn the shape of in about a minute on a laptop CPU. All text is generated here, so
the data carries the project's license. Only the Python standard library, sentencepiece and mytune are needed.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script from a checkout

import sentencepiece as spm  # noqa: E402

from mytune.data.instruct import alpaca_prompt  # noqa: E402

DEFAULT_OUT_DIR = REPO_ROOT / "mytune" / "assets" / "demo"
DATASET_FILE = "alpaca_demo.jsonl"
TOKENIZER_FILE = "tokenizer.model"
PREFERENCE_FILE = "preference_demo.jsonl"

# ----------------------------------------------------------------------------------------------------------------------
# Small tables the tasks draw from.

WORDS = (
    "apple river stone cloud green quiet small bright house garden window music paper light water table chair "
    "bird fish tree road song night morning yellow blue red happy warm cold fast slow little big sun moon star "
    "dog cat horse book pen door lamp ship train field hill lake rain snow wind fire sand leaf rose"
).split()

OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "happy": "sad", "light": "dark", "old": "new",
    "open": "closed", "early": "late", "full": "empty", "high": "low", "hard": "soft", "long": "short",
    "rich": "poor", "wet": "dry", "strong": "weak", "left": "right", "win": "lose", "in": "out", "day": "night",
    "loud": "quiet", "thick": "thin", "clean": "dirty", "young": "old", "near": "far", "heavy": "light",
    "first": "last", "good": "bad", "push": "pull", "top": "bottom", "always": "never", "buy": "sell",
}

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "China": "Beijing",
    "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens",
    "Portugal": "Lisbon", "Ireland": "Dublin", "Austria": "Vienna", "Russia": "Moscow", "India": "New Delhi",
    "Mexico": "Mexico City", "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Australia": "Canberra",
    "Turkey": "Ankara", "Cuba": "Havana", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Denmark": "Copenhagen",
}

PLURALS = {
    "cat": "cats", "dog": "dogs", "box": "boxes", "bus": "buses", "city": "cities", "baby": "babies",
    "child": "children", "mouse": "mice", "man": "men", "woman": "women", "tooth": "teeth", "foot": "feet",
    "leaf": "leaves", "knife": "knives", "wolf": "wolves", "sheep": "sheep", "fish": "fish", "goose": "geese",
    "person": "people", "book": "books", "tree": "trees", "glass": "glasses", "dish": "dishes", "key": "keys",
    "toy": "toys", "day": "days", "party": "parties", "story": "stories", "hero": "heroes", "potato": "potatoes",
}

ANIMALS = {  # name: (sound, legs, home)
    "cow": ("moo", 4, "a farm"), "dog": ("woof", 4, "a house"), "cat": ("meow", 4, "a house"),
    "duck": ("quack", 2, "a pond"), "sheep": ("baa", 4, "a farm"), "horse": ("neigh", 4, "a stable"),
    "lion": ("roar", 4, "the savanna"), "owl": ("hoot", 2, "a tree"), "frog": ("croak", 4, "a pond"),
    "pig": ("oink", 4, "a farm"), "bee": ("buzz", 6, "a hive"), "snake": ("hiss", 0, "the grass"),
    "chicken": ("cluck", 2, "a coop"), "mouse": ("squeak", 4, "a hole"), "spider": ("nothing", 8, "a web"),
}

COLORS = {
    "the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black",
    "a tomato": "red", "an orange": "orange", "a lemon": "yellow", "milk": "white", "a leaf": "green",
    "the night sky": "black", "a strawberry": "red", "a plum": "purple", "chocolate": "brown", "the sea": "blue",
}

NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
).split()

DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = "January February March April May June July August September October November December".split()


# ----------------------------------------------------------------------------------------------------------------------
# Tasks: each takes a random.Random and returns one (instruction, input, output) row. Instructions are paraphrased a
# little so the model has to read them; inputs are empty where the instruction says it all.

def _words(rng: random.Random, low: int = 3, high: int = 6) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


def _numbers(rng: random.Random, low: int = 3, high: int = 6, top: int = 99) -> list[int]:
    return rng.sample(range(top + 1), rng.randint(low, high))


def reverse_words(rng):
    words = _words(rng)
    instruction = rng.choice(["Reverse the order of the words.", "Write these words in reverse order.",
                              "Reverse the list of words."])
    return instruction, " ".join(words), " ".join(reversed(words))


def sort_numbers(rng):
    numbers = _numbers(rng)
    if rng.random() < 0.5:
        instruction = rng.choice(["Sort the numbers from smallest to largest.",
                                  "Sort these numbers in ascending order."])
        result = sorted(numbers)
    else:
        instruction = rng.choice(["Sort the numbers from largest to smallest.",
                                  "Sort these numbers in descending order."])
        result = sorted(numbers, reverse=True)
    return instruction, ", ".join(map(str, numbers)), ", ".join(map(str, result))


def sort_words(rng):
    words = _words(rng)
    instruction = rng.choice(["Sort the words alphabetically.", "Put these words in alphabetical order."])
    return instruction, " ".join(words), " ".join(sorted(words))


def add_numbers(rng):
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    if rng.random() < 0.5:
        return rng.choice(["Add the two numbers.", "What is the sum of these numbers?"]), f"{a} + {b}", str(a + b)
    return f"What is {a} plus {b}?", "", f"{a} plus {b} is {a + b}."


def subtract_numbers(rng):
    a = rng.randint(0, 60)
    b = rng.randint(0, a)
    if rng.random() < 0.5:
        instruction = rng.choice(["Subtract the second number from the first.", "Compute the difference."])
        return instruction, f"{a} - {b}", str(a - b)
    return f"What is {a} minus {b}?", "", f"{a} minus {b} is {a - b}."


def compare_numbers(rng):
    a, b = rng.sample(range(100), 2)
    if rng.random() < 0.5:
        return "Which number is larger?", f"{a} or {b}", str(max(a, b))
    return "Which number is smaller?", f"{a} or {b}", str(min(a, b))


def max_min(rng):
    numbers = _numbers(rng, 4, 7)
    if rng.random() < 0.5:
        return rng.choice(["Find the largest number.", "What is the maximum of these numbers?"]), \
            ", ".join(map(str, numbers)), str(max(numbers))
    return rng.choice(["Find the smallest number.", "What is the minimum of these numbers?"]), \
        ", ".join(map(str, numbers)), str(min(numbers))


def even_odd(rng):
    n = rng.randint(0, 200)
    instruction = rng.choice(["Is the number even or odd?", "Say whether this number is even or odd."])
    return instruction, str(n), "even" if n % 2 == 0 else "odd"


def number_to_word(rng):
    n = rng.randint(0, 20)
    if rng.random() < 0.5:
        return "Write the number in words.", str(n), NUMBER_WORDS[n]
    return "Write the word as a number.", NUMBER_WORDS[n], str(n)


def uppercase(rng):
    words = _words(rng, 2, 5)
    instruction = rng.choice(["Convert the text to uppercase.", "Write this phrase in capital letters."])
    return instruction, " ".join(words), " ".join(words).upper()


def capitalize_words(rng):
    words = _words(rng, 2, 5)
    return "Capitalize the first letter of each word.", " ".join(words), " ".join(w.capitalize() for w in words)


def count_letters(rng):
    word = rng.choice(WORDS)
    if rng.random() < 0.5:
        return f"How many letters are in the word {word}?", "", str(len(word))
    return "Count the letters in the word.", word, str(len(word))


def count_words(rng):
    words = _words(rng, 2, 8)
    return rng.choice(["How many words are in the text?", "Count the words."]), " ".join(words), str(len(words))


def spell_word(rng):
    word = rng.choice(WORDS)
    return rng.choice(["Spell the word with dashes between the letters.", "Spell out the word."]), word, "-".join(word)


def first_last(rng):
    words = _words(rng)
    if rng.random() < 0.5:
        return "What is the first word?", " ".join(words), words[0]
    return "What is the last word?", " ".join(words), words[-1]


def repeat_word(rng):
    word, times = rng.choice(WORDS), rng.randint(2, 5)
    return f"Repeat the word {times} times.", word, " ".join([word] * times)


def opposite(rng):
    word = rng.choice(sorted(OPPOSITES))
    if rng.random() < 0.5:
        return f"What is the opposite of {word}?", "", f"The opposite of {word} is {OPPOSITES[word]}."
    return "Give the opposite of the word.", word, OPPOSITES[word]


def capital(rng):
    country = rng.choice(sorted(CAPITALS))
    if rng.random() < 0.5:
        return f"What is the capital of {country}?", "", f"The capital of {country} is {CAPITALS[country]}."
    return "Name the capital city of the country.", country, CAPITALS[country]


def plural(rng):
    noun = rng.choice(sorted(PLURALS))
    if rng.random() < 0.5:
        return f"What is the plural of {noun}?", "", f"The plural of {noun} is {PLURALS[noun]}."
    return "Write the plural form of the noun.", noun, PLURALS[noun]


def animal_fact(rng):
    animal = rng.choice(sorted(ANIMALS))
    sound, legs, home = ANIMALS[animal]
    kind = rng.randrange(3)
    if kind == 0:
        return f"What sound does a {animal} make?", "", f"A {animal} says {sound}."
    if kind == 1:
        return f"How many legs does a {animal} have?", "", f"A {animal} has {legs} legs."
    return f"Where does a {animal} live?", "", f"A {animal} lives in {home}."


def color_of(rng):
    thing = rng.choice(sorted(COLORS))
    return f"What color is {thing}?", "", f"{thing[0].upper() + thing[1:]} is {COLORS[thing]}."


def continue_sequence(rng):
    start, step, length = rng.randint(0, 20), rng.randint(1, 9), rng.randint(3, 5)
    sequence = [start + step * i for i in range(length + 3)]
    instruction = rng.choice(["Continue the sequence with the next three numbers.", "What are the next three numbers?"])
    return instruction, ", ".join(map(str, sequence[:length])), ", ".join(map(str, sequence[length:]))


def next_in_cycle(rng):
    names = DAYS if rng.random() < 0.5 else MONTHS
    i = rng.randrange(len(names))
    kind = "day" if names is DAYS else "month"
    if rng.random() < 0.5:
        return f"What {kind} comes after {names[i]}?", "", names[(i + 1) % len(names)]
    return f"What {kind} comes before {names[i]}?", "", names[i - 1]


def word_in_list(rng):
    words = _words(rng, 3, 6)
    probe = rng.choice(words) if rng.random() < 0.5 else rng.choice(WORDS)
    return f"Is the word {probe} in the list? Answer yes or no.", " ".join(words), "yes" if probe in words else "no"


TASKS = (
    reverse_words, sort_numbers, sort_words, add_numbers, subtract_numbers, compare_numbers, max_min, even_odd,
    number_to_word, uppercase, capitalize_words, count_letters, count_words, spell_word, first_last, repeat_word,
    opposite, capital, plural, animal_fact, color_of, continue_sequence, next_in_cycle, word_in_list,
)


# ----------------------------------------------------------------------------------------------------------------------
# The SFT demo data (alpaca_demo.jsonl): facts a ~1M-parameter model learns in about a minute. Each of the 152 facts
# (a capital, an opposite, a plural, an animal's sound, legs and home, a colour) is asked in 8 phrasings, so the model
# meets it 8 times an epoch; prompts stay distinct, and the held-out rows ask known facts in other words. The template
# tasks above (sorting, arithmetic, reversing) need far more training than a minute gives a model this small (after
# 474 steps on them it answered "The capital of The is Thight"): they train the tokenizer and make the preference pairs.

def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def fact_questions() -> list[list[tuple[str, str, str]]]:
    """Per fact, its phrasings as (instruction, input, output) rows."""
    facts = []
    for country, city in CAPITALS.items():
        full = f"The capital of {country} is {city}."
        facts.append([
            (f"What is the capital of {country}?", "", full), ("Name the capital city of the country.", country, city),
            (f"Which city is the capital of {country}?", "", full), (f"Tell me the capital of {country}.", "", full),
            (f"What is the capital city of {country}?", "", full), ("Give the capital of the country.", country, city),
            (f"Name the capital of {country}.", "", full), ("What is the capital of this country?", country, full),
        ])
    for word, other in OPPOSITES.items():
        full = f"The opposite of {word} is {other}."
        facts.append([
            (f"What is the opposite of {word}?", "", full), ("Give the opposite of the word.", word, other),
            (f"Name the opposite of {word}.", "", full), (f"Tell me the opposite of {word}.", "", full),
            (f"Which word is the opposite of {word}?", "", full), ("Write the opposite of the word.", word, other),
            (f"What word means the opposite of {word}?", "", full), ("What is the opposite of this word?", word, full),
        ])
    for noun, many in PLURALS.items():
        full = f"The plural of {noun} is {many}."
        facts.append([
            (f"What is the plural of {noun}?", "", full), ("Write the plural form of the noun.", noun, many),
            (f"Give the plural of {noun}.", "", full), (f"Tell me the plural of {noun}.", "", full),
            (f"What is the plural form of {noun}?", "", full), ("Give the plural of the noun.", noun, many),
            (f"Write the plural of {noun}.", "", full), ("What is the plural of this word?", noun, full),
        ])
    for animal, (sound, legs, home) in ANIMALS.items():
        says, has, lives = f"A {animal} says {sound}.", f"A {animal} has {legs} legs.", f"A {animal} lives in {home}."
        facts.append([
            (f"What sound does a {animal} make?", "", says), (f"What does a {animal} say?", "", says),
            (f"Which sound does a {animal} make?", "", says), ("What sound does this animal make?", animal, says),
            (f"Tell me the sound a {animal} makes.", "", says), ("What does this animal say?", animal, says),
            (f"Name the sound of a {animal}.", "", says), (f"How does a {animal} sound?", "", says),
        ])
        facts.append([
            (f"How many legs does a {animal} have?", "", has), ("How many legs does this animal have?", animal, has),
            (f"Count the legs of a {animal}.", "", has), (f"Tell me how many legs a {animal} has.", "", has),
            (f"What is the number of legs of a {animal}?", "", has), ("Count the legs of this animal.", animal, has),
            (f"A {animal} has how many legs?", "", has), (f"Give the number of legs of a {animal}.", "", has),
        ])
        facts.append([
            (f"Where does a {animal} live?", "", lives), ("Where does this animal live?", animal, lives),
            (f"What is the home of a {animal}?", "", lives), (f"Tell me where a {animal} lives.", "", lives),
            (f"Name the home of a {animal}.", "", lives), ("What is the home of this animal?", animal, lives),
            (f"Where can you find a {animal}?", "", lives), (f"Where is the home of a {animal}?", "", lives),
        ])
    for thing, color in COLORS.items():
        full = f"{_sentence(thing)} is {color}."
        facts.append([
            (f"What color is {thing}?", "", full), (f"What is the color of {thing}?", "", full),
            (f"Tell me the color of {thing}.", "", full), ("What color is this?", thing, full),
            (f"Name the color of {thing}.", "", full), ("Give the color of this.", thing, full),
            (f"Which color is {thing}?", "", full), (f"Say what color {thing} is.", "", full),
        ])
    return facts


def make_demo_rows(seed: int) -> list[dict]:
    """alpaca_demo.jsonl: every phrasing of every fact (distinct prompts), shuffled."""
    rows = [{"instruction": i, "input": x, "output": o} for phrasings in fact_questions() for i, x, o in phrasings]
    assert len({(row["instruction"], row["input"]) for row in rows}) == len(rows), "two facts share a prompt"
    random.Random(seed).shuffle(rows)
    return rows


def make_rows(num_rows: int, seed: int) -> list[dict]:
    """`num_rows` distinct rows drawn round-robin from the tasks; a task whose table runs out of new rows drops out."""
    return [row for _, row in make_task_rows(num_rows, seed)]


def make_task_rows(num_rows: int, seed: int) -> list[tuple[object, dict]]:
    """`make_rows`' rows, each with the task that wrote it."""
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    rows: list[tuple[object, dict]] = []
    misses = Counter()
    active = list(TASKS)
    while len(rows) < num_rows and active:
        for task in list(active):
            instruction, input_text, output = task(rng)
            if (instruction, input_text) in seen:
                misses[task] += 1
                if misses[task] > 50:
                    active.remove(task)
                continue
            seen.add((instruction, input_text))
            rows.append((task, {"instruction": instruction, "input": input_text, "output": output}))
            if len(rows) == num_rows:
                break
    rng.shuffle(rows)
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Preference pairs (mytune/assets/demo/preference_demo.jsonl): the same tasks; chosen = the answer as the SFT data
# writes it, rejected = a plausible wrong answer of the same shape. Each wrong-answer function takes a random.Random
# and the row, and returns a different answer of the same shape.

def _other(rng: random.Random, choices, correct):
    return rng.choice(sorted({choice for choice in choices if choice != correct}))


def _replace_last(text: str, old: str, new: str) -> str:
    head, found, tail = text.rpartition(old)
    assert found, (text, old)
    return head + new + tail


def _off_by(rng: random.Random, value: int, low: int = 0) -> int:
    """A nearby wrong number, never below `low`."""
    return _other(rng, [n for n in range(value - 3, value + 4) if n >= low], value)


def _shuffled(rng: random.Random, items: list, correct: list) -> list:
    for _ in range(20):
        candidate = rng.sample(items, len(items))
        if candidate != correct:
            return candidate
    return list(reversed(correct))


def _wrong_number_at_end(rng, instruction, input_text, output):
    number = re.findall(r"\d+", output)[-1]
    return _replace_last(output, number, str(_off_by(rng, int(number))))


def _wrong_order(separator):
    def wrong(rng, instruction, input_text, output):
        correct = output.split(separator)
        return separator.join(_shuffled(rng, correct, correct))
    return wrong


def _wrong_pick_from_input(separator):
    def wrong(rng, instruction, input_text, output):
        return _other(rng, input_text.split(separator), output)
    return wrong


def _wrong_table_value(values):
    def wrong(rng, instruction, input_text, output):
        longest_first = sorted(values, key=len, reverse=True)  # "cold" before "old"
        correct = next(value for value in longest_first if output.endswith((value, value + ".")))
        return _replace_last(output, correct, _other(rng, values, correct))
    return wrong


def wrong_number_to_word(rng, instruction, input_text, output):
    if output.isdigit():
        return str(_off_by(rng, int(output)))
    n = NUMBER_WORDS.index(output)
    return NUMBER_WORDS[_other(rng, [m for m in range(n - 3, n + 4) if 0 <= m < len(NUMBER_WORDS)], n)]


def wrong_plural(rng, instruction, input_text, output):
    """The noun left singular (the usual slip), or another plural where the two are the same word (sheep, fish)."""
    noun = input_text or instruction.removeprefix("What is the plural of ").removesuffix("?")
    correct = PLURALS[noun]
    return _replace_last(output, correct, noun if noun != correct else _other(rng, PLURALS.values(), correct))


def wrong_spelling(rng, instruction, input_text, output):
    letters = output.split("-")
    drop = rng.randrange(len(letters))
    return "-".join(letters[:drop] + letters[drop + 1:])


def wrong_repeat(rng, instruction, input_text, output):
    times = len(output.split())
    return " ".join([input_text] * _other(rng, [times - 1, times + 1] if times > 2 else [times + 1], times))


def wrong_animal_fact(rng, instruction, input_text, output):
    if " says " in output:
        return _wrong_table_value([sound for sound, _, _ in ANIMALS.values()])(rng, instruction, input_text, output)
    if " has " in output:
        legs = re.findall(r"\d+", output)[-1]
        return _replace_last(output, f"{legs} legs", f"{_other(rng, [0, 2, 4, 6, 8], int(legs))} legs")
    return _wrong_table_value([home for _, _, home in ANIMALS.values()])(rng, instruction, input_text, output)


def wrong_sequence(rng, instruction, input_text, output):
    given = [int(n) for n in input_text.split(", ")]
    step = given[1] - given[0]
    wrong_step = _other(rng, [s for s in range(step - 2, step + 3) if s > 0], step)
    return ", ".join(str(given[-1] + wrong_step * i) for i in range(1, 4))


def wrong_cycle(rng, instruction, input_text, output):
    names = DAYS if output in DAYS else MONTHS
    asked = next(name for name in names if instruction.endswith(f" {name}?"))
    i = names.index(asked)
    return names[(i - 1) % len(names)] if names[(i + 1) % len(names)] == output else names[(i + 1) % len(names)]


WRONG_ANSWERS = {
    reverse_words: _wrong_order(" "),
    sort_numbers: _wrong_order(", "),
    sort_words: _wrong_order(" "),
    add_numbers: _wrong_number_at_end,
    subtract_numbers: _wrong_number_at_end,
    compare_numbers: _wrong_pick_from_input(" or "),
    max_min: _wrong_pick_from_input(", "),
    even_odd: lambda rng, instruction, input_text, output: "odd" if output == "even" else "even",
    number_to_word: wrong_number_to_word,
    uppercase: lambda rng, instruction, input_text, output: input_text,
    capitalize_words: lambda rng, instruction, input_text, output: input_text,
    count_letters: _wrong_number_at_end,
    count_words: _wrong_number_at_end,
    spell_word: wrong_spelling,
    first_last: _wrong_pick_from_input(" "),
    repeat_word: wrong_repeat,
    opposite: _wrong_table_value(OPPOSITES.values()),
    capital: _wrong_table_value(CAPITALS.values()),
    plural: wrong_plural,
    animal_fact: wrong_animal_fact,
    color_of: _wrong_table_value(COLORS.values()),
    continue_sequence: wrong_sequence,
    next_in_cycle: wrong_cycle,
    word_in_list: lambda rng, instruction, input_text, output: "no" if output == "yes" else "yes",
}


def make_preference_rows(num_rows: int, seed: int, known_words: set[str]) -> list[dict]:
    """`num_rows` TRL standard rows {"prompt", "chosen", "rejected"} from the tasks, deterministic for a seed.

    The prompt is the instruction, then a blank line and the input when there is one (as a chat template shows an
    instruct row); chosen is the correct answer, rejected a wrong one. Rows are kept only when all their words are
    in `known_words` (the SFT data's, which the demo tokenizer was trained on). The wrong answers draw from their own
    random stream, so the tasks draw exactly as `make_rows` does.
    """
    rng = random.Random(f"{seed}:wrong answers")
    rows = []
    for task, row in make_task_rows(2 * num_rows, seed):
        instruction, input_text, output = row["instruction"], row["input"], row["output"]
        prompt = instruction + (f"\n\n{input_text}" if input_text else "")
        if not words_of(prompt + " " + output) <= known_words:
            continue
        for _ in range(20):
            wrong = WRONG_ANSWERS[task](rng, instruction, input_text, output)
            assert wrong != output, (task.__name__, row, wrong)
            if words_of(wrong) <= known_words:
                rows.append({"prompt": prompt, "chosen": output, "rejected": wrong})
                break
        if len(rows) == num_rows:
            break
    assert len(rows) == num_rows, f"only {len(rows)} preference rows; lower --preference-rows"
    return rows


def words_of(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z]+", text))


def train_tokenizer(rows: list[dict], vocab_size: int) -> bytes:
    """A llama-2 style SentencePiece BPE model (unk 0, <s> 1, </s> 2, no pad, byte fallback, digits split).

    Trained on the formatted prompts and outputs, one line each (newlines become byte tokens, as in llama-2).
    Identity normalization keeps decode(encode(text)) == text and the file small; one thread keeps it deterministic.
    """
    lines = []
    for row in rows:
        text = alpaca_prompt(row["instruction"], row["input"]) + row["output"]
        lines.extend(line for line in text.split("\n") if line)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
    )
    return model.getvalue()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where to write the assets")
    parser.add_argument("--num-rows", type=int, default=2000, help="task rows (the tokenizer's training text)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the rows")
    parser.add_argument("--vocab-size", type=int, default=512, help="tokenizer vocabulary size")
    parser.add_argument("--preference-rows", type=int, default=1000, help="preference dataset rows")
    parser.add_argument("--preference-seed", type=int, default=1, help="random seed for the preference rows")
    parser.add_argument("--preference-only", action="store_true",
                        help=f"write only {PREFERENCE_FILE} (leave the SFT data and the tokenizer as they are)")
    args = parser.parse_args(argv)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = make_rows(args.num_rows, args.seed)
    known_words = set().union(*(words_of(" ".join(row.values())) for row in rows))
    pairs = make_preference_rows(args.preference_rows, args.preference_seed, known_words)
    write_jsonl(args.out_dir / PREFERENCE_FILE, pairs)
    print(f"wrote {len(pairs)} preference rows to {args.out_dir / PREFERENCE_FILE}")
    if args.preference_only:
        return
    model_bytes = train_tokenizer(rows, args.vocab_size)
    demo_rows = make_demo_rows(args.seed)
    write_jsonl(args.out_dir / DATASET_FILE, demo_rows)
    (args.out_dir / TOKENIZER_FILE).write_bytes(model_bytes)

    processor = spm.SentencePieceProcessor(model_proto=model_bytes)
    lengths = [2 + len(processor.encode(alpaca_prompt(row["instruction"], row["input"])))
               + len(processor.encode(row["output"])) for row in demo_rows]
    print(f"wrote {len(demo_rows)} rows to {args.out_dir / DATASET_FILE}")
    print(f"wrote {args.out_dir / TOKENIZER_FILE}: {len(model_bytes)} bytes, vocab {processor.get_piece_size()}")
    print(f"tokens per row (bos + prompt + output + eos): mean {statistics.mean(lengths):.1f}, max {max(lengths)}")


if __name__ == "__main__":
    main()
