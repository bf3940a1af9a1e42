"""Generate the embedded demo assets: a small instruction dataset of facts, a SentencePiece tokenizer, and preference
pairs (a right and a wrong answer) on the same facts.

Regenerate (deterministic, idempotent: the same bytes every run) from the repository root with

    python scripts/make_demo_assets.py            # writes mytune/assets/demo/{alpaca_demo.jsonl,tokenizer.model,
                                                  #                           preference_demo.jsonl}
    python scripts/make_demo_assets.py --preference-only    # only preference_demo.jsonl

alpaca_demo.jsonl holds 152 facts (capitals, opposites, plurals, animals, colours), each asked in 8 phrasings: what a
~1M-parameter model learns in about a minute on a laptop CPU. The tokenizer is trained on short template-written
tasks (reverse words, sort or add numbers, ...) over the same words. All text is generated here, so the data carries
the project's license. Only the Python standard library, sentencepiece and mytune are needed.
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


def fact_questions() -> list[tuple[str, list[tuple[str, str, str]]]]:
    """Per fact, its kind (capital, opposite, plural, sound, legs, home, color) and its phrasings as
    (instruction, input, output) rows."""
    facts = []
    for country, city in CAPITALS.items():
        full = f"The capital of {country} is {city}."
        facts.append(("capital", [
            (f"What is the capital of {country}?", "", full), ("Name the capital city of the country.", country, city),
            (f"Which city is the capital of {country}?", "", full), (f"Tell me the capital of {country}.", "", full),
            (f"What is the capital city of {country}?", "", full), ("Give the capital of the country.", country, city),
            (f"Name the capital of {country}.", "", full), ("What is the capital of this country?", country, full),
        ]))
    for word, other in OPPOSITES.items():
        full = f"The opposite of {word} is {other}."
        facts.append(("opposite", [
            (f"What is the opposite of {word}?", "", full), ("Give the opposite of the word.", word, other),
            (f"Name the opposite of {word}.", "", full), (f"Tell me the opposite of {word}.", "", full),
            (f"Which word is the opposite of {word}?", "", full), ("Write the opposite of the word.", word, other),
            (f"What word means the opposite of {word}?", "", full), ("What is the opposite of this word?", word, full),
        ]))
    for noun, many in PLURALS.items():
        full = f"The plural of {noun} is {many}."
        facts.append(("plural", [
            (f"What is the plural of {noun}?", "", full), ("Write the plural form of the noun.", noun, many),
            (f"Give the plural of {noun}.", "", full), (f"Tell me the plural of {noun}.", "", full),
            (f"What is the plural form of {noun}?", "", full), ("Give the plural of the noun.", noun, many),
            (f"Write the plural of {noun}.", "", full), ("What is the plural of this word?", noun, full),
        ]))
    for animal, (sound, legs, home) in ANIMALS.items():
        says, has, lives = f"A {animal} says {sound}.", f"A {animal} has {legs} legs.", f"A {animal} lives in {home}."
        facts.append(("sound", [
            (f"What sound does a {animal} make?", "", says), (f"What does a {animal} say?", "", says),
            (f"Which sound does a {animal} make?", "", says), ("What sound does this animal make?", animal, says),
            (f"Tell me the sound a {animal} makes.", "", says), ("What does this animal say?", animal, says),
            (f"Name the sound of a {animal}.", "", says), (f"How does a {animal} sound?", "", says),
        ]))
        facts.append(("legs", [
            (f"How many legs does a {animal} have?", "", has), ("How many legs does this animal have?", animal, has),
            (f"Count the legs of a {animal}.", "", has), (f"Tell me how many legs a {animal} has.", "", has),
            (f"What is the number of legs of a {animal}?", "", has), ("Count the legs of this animal.", animal, has),
            (f"A {animal} has how many legs?", "", has), (f"Give the number of legs of a {animal}.", "", has),
        ]))
        facts.append(("home", [
            (f"Where does a {animal} live?", "", lives), ("Where does this animal live?", animal, lives),
            (f"What is the home of a {animal}?", "", lives), (f"Tell me where a {animal} lives.", "", lives),
            (f"Name the home of a {animal}.", "", lives), ("What is the home of this animal?", animal, lives),
            (f"Where can you find a {animal}?", "", lives), (f"Where is the home of a {animal}?", "", lives),
        ]))
    for thing, color in COLORS.items():
        full = f"{_sentence(thing)} is {color}."
        facts.append(("color", [
            (f"What color is {thing}?", "", full), (f"What is the color of {thing}?", "", full),
            (f"Tell me the color of {thing}.", "", full), ("What color is this?", thing, full),
            (f"Name the color of {thing}.", "", full), ("Give the color of this.", thing, full),
            (f"Which color is {thing}?", "", full), (f"Say what color {thing} is.", "", full),
        ]))
    return facts


def make_demo_rows(seed: int) -> list[dict]:
    """alpaca_demo.jsonl: every phrasing of every fact (distinct prompts), shuffled."""
    rows = [{"instruction": i, "input": x, "output": o} for _, phrasings in fact_questions() for i, x, o in phrasings]
    assert len({(row["instruction"], row["input"]) for row in rows}) == len(rows), "two facts share a prompt"
    random.Random(seed).shuffle(rows)
    return rows


def make_rows(num_rows: int, seed: int) -> list[dict]:
    """`num_rows` distinct rows drawn round-robin from the tasks; a task whose table runs out of new rows drops out."""
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    rows: list[dict] = []
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
            rows.append({"instruction": instruction, "input": input_text, "output": output})
            if len(rows) == num_rows:
                break
    rng.shuffle(rows)
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Preference pairs (mytune/assets/demo/preference_demo.jsonl): the facts again, in the phrasings without an input (so
# a standard-form prompt renders exactly as the SFT rows did); chosen = the right answer, rejected = the same sentence
# with another fact's value of the same kind ("The capital of France is Lima."). The DPO demos start from the SFT
# demo's checkpoint, which knows the facts: preference tuning sharpens what it knows, and the held-out pairs show it.

ANSWER_SPLIT = re.compile(r"^(.*? (?:is|says|has|lives in) )(.*)$")


def make_preference_rows(seed: int) -> list[dict]:
    """TRL standard rows {"prompt", "chosen", "rejected"}, one per fact phrasing without an input, shuffled."""
    facts = fact_questions()
    values: dict[str, set[str]] = {}
    for kind, phrasings in facts:
        values.setdefault(kind, set()).add(ANSWER_SPLIT.match(phrasings[0][2]).group(2))
    rng = random.Random(seed)
    rows = []
    for kind, phrasings in facts:
        for instruction, input_text, output in phrasings:
            if input_text:
                continue
            head, value = ANSWER_SPLIT.match(output).groups()
            wrong = head + rng.choice(sorted(values[kind] - {value}))
            rows.append({"prompt": instruction, "chosen": output, "rejected": wrong})
    rng.shuffle(rows)
    return rows


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
    parser.add_argument("--preference-seed", type=int, default=1, help="random seed for the preference rows")
    parser.add_argument("--preference-only", action="store_true",
                        help=f"write only {PREFERENCE_FILE} (leave the SFT data and the tokenizer as they are)")
    args = parser.parse_args(argv)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = make_rows(args.num_rows, args.seed)
    pairs = make_preference_rows(args.preference_seed)
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
