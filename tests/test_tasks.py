"""The text-edit and instruction tasks and the task registry: disjoint, sized and seeded splits,
every answer graded right by its own task, hand-checked examples of each kind and category, the
computed answers recomputed here by other means, and the facts checked against tables written
here."""

from __future__ import annotations

import calendar
import datetime
import json
import re
from fractions import Fraction
from itertools import pairwise

import pytest

from salora.chat import read_chat_jsonl
from salora.errors import SaLoRAError
from salora.tasks import TASKS, arithmetic, instructions, textedit

NEW_TASKS = (textedit, instructions)
SIZES = {"train": 3000, "validation": 200, "test": 300}


@pytest.fixture(scope="module")
def pools():
    return {task: task.splits() for task in NEW_TASKS}


def every(pools, task):
    return [item for items in pools[task].values() for item in items]


def kind_of(item) -> str:
    return item.kind if isinstance(item, textedit.Edit) else item.category


# Both tasks ------------------------------------------------------------------------------------


def test_registry_names_the_three_tasks():
    assert TASKS == {"arithmetic": arithmetic, "textedit": textedit, "instructions": instructions}
    for task in TASKS.values():
        for name in ("generate", "splits", "to_messages", "extract_answer", "accuracy", "write_jsonl"):
            assert callable(getattr(task, name)), (task.__name__, name)
        item = task.generate(1, seed=0)[0]
        assert task.to_messages(item) == [{"role": "user", "content": item.question}, {"role": "assistant", "content": item.answer_text}]
        assert task.accuracy([item.answer_text], [item]) == 1.0


@pytest.mark.parametrize("task", NEW_TASKS, ids=lambda t: t.__name__)
def test_splits_sized_and_disjoint(pools, task):
    assert {name: len(items) for name, items in pools[task].items()} == SIZES
    questions = [item.question for item in every(pools, task)]
    assert len(set(questions)) == len(questions) == sum(SIZES.values())
    by_split = {name: {item.question for item in items} for name, items in pools[task].items()}
    assert not by_split["train"] & by_split["test"] and not by_split["train"] & by_split["validation"]
    assert not by_split["validation"] & by_split["test"]


@pytest.mark.parametrize("task", NEW_TASKS, ids=lambda t: t.__name__)
def test_every_kind_in_train_and_test(pools, task):
    kinds = set(textedit.KINDS) if task is textedit else set(instructions.CATEGORIES)
    for split in ("train", "test"):
        assert {kind_of(item) for item in pools[task][split]} == kinds, split


@pytest.mark.parametrize("task", NEW_TASKS, ids=lambda t: t.__name__)
def test_deterministic_by_seed(pools, task):
    assert task.generate(50, seed=7) == task.generate(50, seed=7)
    assert task.generate(50, seed=7) != task.generate(50, seed=8)
    assert task.splits(0) == pools[task]
    assert task.splits(1)["test"] != pools[task]["test"]


@pytest.mark.parametrize("task", NEW_TASKS, ids=lambda t: t.__name__)
def test_own_answers_graded_right_and_wrong_ones_wrong(pools, task):
    items = every(pools, task)
    assert task.accuracy([item.answer_text for item in items], items) == 1.0
    assert task.accuracy([f"{item.answer_text} extra" for item in items], items) == 0.0
    assert task.accuracy(["" for _ in items], items) == 0.0
    test = pools[task]["test"]
    # another item's answer where that answer is not also this item's
    shifted = [(item, other.answer_text) for item, other in zip(test, test[1:] + test[:1]) if other.answer_text != item.answer_text]
    assert len(shifted) > 250
    if task is instructions:
        shifted = [(item, answer) for item, answer in shifted if instructions.normalise(answer) not in item.accepted]
    assert task.accuracy([a for _, a in shifted], [item for item, _ in shifted]) == 0.0


@pytest.mark.parametrize("task", NEW_TASKS, ids=lambda t: t.__name__)
def test_accuracy_errors_and_mixture(pools, task):
    items = pools[task]["test"][:4]
    responses = [items[0].answer_text, "no idea", f"\n  {items[2].answer_text}  \n", "wrong"]
    assert task.accuracy(responses, items) == 0.5
    with pytest.raises(SaLoRAError):
        task.accuracy(responses[:3], items)
    with pytest.raises(SaLoRAError):
        task.accuracy([], [])


@pytest.mark.parametrize("task", NEW_TASKS, ids=lambda t: t.__name__)
def test_messages_and_jsonl(tmp_path, pools, task):
    items = pools[task]["validation"][:20]
    path = tmp_path / "task.jsonl"
    task.write_jsonl(items, path)
    assert read_chat_jsonl(path) == [task.to_messages(item) for item in items]
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    if task is textedit:
        assert [(r["answer"], r["kind"]) for r in rows] == [(e.answer_text, e.kind) for e in items]
    else:
        assert [(tuple(r["accepted"]), r["category"]) for r in rows] == [(i.accepted, i.category) for i in items]


# Text edits ------------------------------------------------------------------------------------

# kind: (fields, answer), worked out by hand
TEXTEDIT_EXAMPLES = {
    "upper": ({"text": "the baker reads a book"}, "THE BAKER READS A BOOK"),
    "lower": ({"text": "The Baker Reads A BOOK"}, "the baker reads a book"),
    "title": ({"text": "my uncle paints the fence"}, "My Uncle Paints The Fence"),
    "reverse_words": ({"text": "the baker reads a book"}, "book a reads baker the"),
    "backwards": ({"text": "garden"}, "nedrag"),
    "hyphens": ({"text": "paper"}, "p-a-p-e-r"),
    "count_letters": ({"text": "umbrella"}, "8"),
    "numbered": ({"text": "pear, plum, apple"}, "1. pear\n2. plum\n3. apple"),
    "sorted": ({"text": "pear, plum, apple, kiwi"}, "apple, kiwi, pear, plum"),
    "replace": ({"text": "the baker reads a book", "old": "baker", "new": "pilot"}, "the pilot reads a book"),
    "spelling": ({"text": "Maya will recieve a parcel"}, "Maya will receive a parcel"),
    "json": ({"text": "name: Maya, age: 31, city: Oslo"}, '{"name": "Maya", "age": 31, "city": "Oslo"}'),
    "count_words": ({"text": "the old farmer feeds the ducks at home"}, "8"),
    "initials": ({"text": "our teacher draws a map"}, "OTDAM"),
    "snake_case": ({"text": "Big Red Rocket"}, "big_red_rocket"),
}


def test_textedit_examples_cover_every_kind():
    assert set(TEXTEDIT_EXAMPLES) == set(textedit.KINDS)
    for name, (fields, answer) in TEXTEDIT_EXAMPLES.items():
        assert textedit.KINDS[name].rule(**fields) == answer, name


def recomputed_edit(kind: str, lead: str, text: str) -> str:
    """The answer to an edit, computed here another way than the module's rules."""
    words = re.findall(r"\S+", text)
    if kind == "replace":
        old, new = re.findall(r'"([a-z]+)"', lead)
        assert words.count(old) == 1
        return re.sub(rf"\b{old}\b", new, text)
    if kind == "spelling":
        (wrong,) = [w for w in words if w in textedit.MISSPELLINGS]
        return re.sub(rf"\b{wrong}\b", textedit.MISSPELLINGS[wrong], text)
    if kind == "json":
        return json.dumps({k: int(v) if re.fullmatch(r"[0-9]+", v) else v for k, v in re.findall(r"(\w+): ([^,]+)", text)})
    return {
        "upper": lambda: "".join(c.upper() for c in text),
        "lower": lambda: "".join(c.lower() for c in text),
        "title": lambda: " ".join(w.capitalize() for w in words),
        "reverse_words": lambda: " ".join(words[::-1]),
        "backwards": lambda: "".join(reversed(text)),
        "hyphens": lambda: "-".join(list(text)),
        "count_letters": lambda: str(sum(c.isalpha() for c in text)),
        "numbered": lambda: "\n".join(f"{n + 1}. {x}" for n, x in enumerate(text.split(", "))),
        "sorted": lambda: ", ".join(sorted(text.split(", "), key=str.lower)),
        "count_words": lambda: str(len(words)),
        "initials": lambda: "".join(w[0] for w in words).upper(),
        "snake_case": lambda: text.lower().replace(" ", "_"),
    }[kind]()


def test_textedit_answers_recomputed(pools):
    for edit in every(pools, textedit):
        lead, text = edit.question.split(": ", 1)
        assert edit.answer_text == recomputed_edit(edit.kind, lead, text), edit
        assert lead in {phrasing.format(**dict(zip(("old", "new"), re.findall(r'"([a-z]+)"', lead)))) for phrasing in textedit.KINDS[edit.kind].leads}
        if edit.kind != "numbered":
            assert "\n" not in edit.answer_text
        if edit.kind in ("upper", "lower", "title", "initials", "spelling", "replace"):
            assert edit.answer_text != text


def test_textedit_spelling_sentences_plant_one_known_misspelling():
    corrections = {"recieve": "receive", "seperate": "separate", "untill": "until", "tommorow": "tomorrow", "wich": "which"}
    assert {k: textedit.MISSPELLINGS[k] for k in corrections} == corrections
    planted = set()
    for sentence in textedit.SPELLING_SENTENCES:
        (right,) = [w for w in sentence.split() if w in textedit.MISSPELLINGS.values()]
        planted.add(right)
    assert planted == set(textedit.MISSPELLINGS.values())


def test_textedit_case_is_graded():
    edit = textedit.Edit("Rewrite in upper case: the baker reads a book", "THE BAKER READS A BOOK", "upper")
    assert textedit.accuracy(["  THE BAKER READS A BOOK \n"], [edit]) == 1.0
    assert textedit.accuracy(["the baker reads a book"], [edit]) == 0.0
    assert textedit.accuracy(["The Baker Reads A Book"], [edit]) == 0.0
    assert textedit.accuracy(["Answer: THE BAKER READS A BOOK"], [edit]) == 0.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [("  book a reads  \n", "book a reads"), ("1. pear  \n  2. plum\n", "1. pear\n2. plum"), ("p-a-p-e-r", "p-a-p-e-r"), ("", "")],
)
def test_textedit_extract_answer(text, expected):
    assert textedit.extract_answer(text) == expected


# Instructions ----------------------------------------------------------------------------------

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Canada": "Ottawa", "Australia": "Canberra", "Egypt": "Cairo",
            "Brazil": "Brasília", "Turkey": "Ankara", "the United Kingdom": "London", "Kenya": "Nairobi", "Peru": "Lima"}
ANTONYMS = {"hot": "cold", "wet": "dry", "buy": "sell", "push": "pull", "north": "south", "win": "lose", "deep": "shallow"}
PLURALS = {"child": "children", "mouse": "mice", "foot": "feet", "knife": "knives", "city": "cities", "sheep": "sheep"}
PAST_TENSES = {"go": "went", "eat": "ate", "bring": "brought", "swim": "swam", "catch": "caught", "put": "put"}
COUNTS = {("legs", "a spider"): 8, ("legs", "an ant"): 6, ("sides", "a hexagon"): 6, ("days", "a leap year"): 366,
          ("keys", "a standard piano"): 88, ("hours", "a day"): 24}
CLASSES = {"a hammer": "tool", "an owl": "animal", "a tulip": "plant", "a tram": "vehicle"}
DEFINITIONS = {"a young dog": "puppy", "a book of maps": "atlas", "a period of ten years": "decade"}
LARGER = {("an elephant", "a mouse"), ("the Sun", "the Moon"), ("Jupiter", "the Earth")}


def test_instruction_facts_agree_with_tables_written_here():
    assert {k: dict(instructions.CAPITALS)[k] for k in CAPITALS} == CAPITALS
    assert {k: instructions.ANTONYMS[k][0] for k in ANTONYMS} == ANTONYMS
    assert {k: instructions.PLURALS[k][0] for k in PLURALS} == PLURALS
    assert {k: instructions.PAST_TENSES[k][0] for k in PAST_TENSES} == PAST_TENSES
    assert {(t, o): n for t, o, n in instructions.COUNTS if (t, o) in COUNTS} == COUNTS
    assert {x: group for group, xs in instructions.CLASSES.items() for x in xs if x in CLASSES} == CLASSES
    assert {d: w for d, w, *_ in instructions.DEFINITIONS if d in DEFINITIONS} == DEFINITIONS
    assert LARGER <= set(instructions.SIZES)


def quoted(question: str) -> str:
    return re.search(r'"(?:to )?([a-z]+)"', question).group(1)


def test_instruction_fact_items_match_their_tables(pools):
    capitals = dict(instructions.CAPITALS)
    countries = {capital: country for country, capital in instructions.CAPITALS}
    seen = {"capital": 0, "antonym": 0, "plural": 0, "past_tense": 0}
    for item in every(pools, instructions):
        q = item.question
        if item.category == "capital":
            country = next((c for c in capitals if f"of {c}?" in q or f"of {c}." in q), None)
            if country:
                expected = capitals[country]
            else:
                expected = countries[next(c for c in countries if q.startswith(c) or f"has {c} as" in q or f"is {c} the" in q)]
                expected = expected[:1].upper() + expected[1:]
            assert item.answer_text == expected, q
            seen["capital"] += country in CAPITALS or expected in CAPITALS.values()
        elif item.category in ("antonym", "plural", "past_tense"):
            word = quoted(q)
            table = {"antonym": ANTONYMS, "plural": PLURALS, "past_tense": PAST_TENSES}[item.category]
            if word in table:
                assert item.answer_text == table[word], q
                seen[item.category] += 1
        elif item.category == "classify":
            thing = re.search(r"(?:Is|Classify|does) (an? [a-z ]+?) (?:an animal|as|belong)", q).group(1)
            assert item.answer_text == CLASSES.get(thing, item.answer_text)
            assert thing in instructions.CLASSES[item.answer_text]
        elif item.category == "definition":
            meaning, options = re.search(r'(?:"|call )(.+?)"?: (.+?)[?.]$', q).groups()
            assert item.answer_text in re.split(r", | or ", options)
            assert item.answer_text == DEFINITIONS.get(meaning, item.answer_text)
    assert all(n > 0 for n in seen.values()), seen


def test_instruction_count_items(pools):
    items = [i for i in every(pools, instructions) if i.category == "count"]
    assert items
    counts = {(t, o): n for t, o, n in instructions.COUNTS}
    for item in items:
        things, owner = next((t, o) for t, o in counts if t in item.question and o.lower() in item.question.lower())
        assert item.answer_text == str(COUNTS.get((things, owner), counts[(things, owner)]))
    spider = instructions.Instruction("How many legs does a spider have?", "8", ("8", "eight"), "count")
    assert instructions.accuracy(["Eight."], [spider]) == 1.0
    eighty_eight = next(i for i in items if i.answer_text == "88")
    assert "eighty-eight" in eighty_eight.accepted


# base units per dimension, written here: millimeters, inches, grams, milliliters, seconds, months
UNIT_SIZES = {
    "kilometers": ("mm", 1_000_000), "meters": ("mm", 1000), "centimeters": ("mm", 10), "millimeters": ("mm", 1),
    "yards": ("in", 36), "feet": ("in", 12), "inches": ("in", 1), "kilograms": ("g", 1000), "grams": ("g", 1),
    "liters": ("ml", 1000), "milliliters": ("ml", 1), "weeks": ("s", 604800), "days": ("s", 86400),
    "hours": ("s", 3600), "minutes": ("s", 60), "seconds": ("s", 1), "years": ("mo", 12), "months": ("mo", 1),
}
MONDAY = datetime.date(2024, 1, 1)  # a Monday


def recomputed_instruction(item: instructions.Instruction) -> str | None:
    """The answer to a computed category's question, worked out here; None for the fact categories."""
    q = item.question
    if item.category == "convert":
        (n, unit), = re.findall(r"(\d+) ([a-z]+)", q)
        to = re.search(r"How many ([a-z]+) are|to ([a-z]+)\.$|how many ([a-z]+)\?$", q)
        to = next(g for g in to.groups() if g)
        (dim, size), (dim_to, size_to) = UNIT_SIZES[unit], UNIT_SIZES[to]
        assert dim == dim_to
        value = Fraction(int(n) * size, size_to)
        assert value.denominator == 1
        return str(value.numerator)
    if item.category == "compare":
        a, b = re.search(r"(?:, |: |Of )(.+?) (?:or|and) (.+?)(?:\?|,)", q).groups()
        larger = "larger" in q
        if re.fullmatch(r"[0-9.]+", a):
            return a if (Fraction(a) > Fraction(b)) == larger else b
        big, small = (a, b) if (a, b) in set(instructions.SIZES) else (b, a)
        assert (big, small) in set(instructions.SIZES)
        return big if larger else small
    if item.category == "sequence":
        shown = re.search(r"((?:[A-Z0-9]+, ){3}[A-Z0-9]+)", q).group(1).split(", ")
        if shown[0].isalpha():
            steps = {ord(b) - ord(a) for a, b in pairwise(shown)}
            assert len(steps) == 1
            return chr(ord(shown[-1]) + steps.pop())
        values = [int(v) for v in shown]
        if len({b - a for a, b in pairwise(values)}) == 1:
            return str(2 * values[-1] - values[-2])
        if len({Fraction(b, a) for a, b in pairwise(values)}) == 1:
            return str(values[-1] * values[-1] // values[-2])
        roots = [round(v**0.5) for v in values]
        assert [r * r for r in roots] == values and roots == list(range(roots[0], roots[0] + 4))
        return str((roots[-1] + 1) ** 2)
    if item.category == "calendar":
        n = int(m.group(1)) if (m := re.search(r"(\d+)", q)) else 1
        if " ago" in q or "before" in q:
            n = -n
        day = next((d for d in calendar.day_name if d in q), None)
        if day:
            start = MONDAY + datetime.timedelta(days=list(calendar.day_name).index(day))
            return (start + datetime.timedelta(days=n)).strftime("%A")
        month = next(m for m in calendar.month_name[1:] if m in q)
        return calendar.month_name[(list(calendar.month_name).index(month) - 1 + n) % 12 + 1]
    if item.category == "parity":
        return ("odd", "even")[int(re.search(r"\d+", q).group()) % 2 == 0]
    if item.category == "alphabetical":
        a, b = re.search(r"([a-z]+),? or ([a-z]+)\?$", q).groups()
        return sorted([a, b])[-1 if "last" in q else 0]
    if item.category == "question":
        words = q.split(": ", 1)[1].rstrip(".").split()
        at = next(i for i, w in enumerate(words) if w in ("is", "are", "was", "were", "can", "will", "has", "have"))
        subject = words[:at]
        if subject[0] in ("The", "Your", "My", "Our", "They"):
            subject[0] = subject[0].lower()
        return " ".join([words[at].capitalize(), *subject, *words[at + 1 :]]) + "?"
    return None


def test_instruction_computed_answers_recomputed(pools):
    computed = {"convert", "compare", "sequence", "calendar", "parity", "alphabetical", "question"}
    checked = set()
    for item in every(pools, instructions):
        expected = recomputed_instruction(item)
        assert (expected is not None) == (item.category in computed)
        if expected is not None:
            assert item.answer_text == expected, item
            checked.add(item.category)
    assert checked == computed


def test_instruction_computed_rules_by_hand():
    assert instructions.convert(3, "kilometers", "meters") == 3000
    assert instructions.convert(180, "minutes", "hours") == 3
    assert instructions.convert(4, "yards", "feet") == 12
    assert instructions.convert(36, "months", "years") == 3
    assert instructions.pick("0.7", "0.65", larger=True) == "0.7"
    assert instructions.pick("0.7", "0.65", larger=False) == "0.65"
    assert instructions.pick("999", "1200", larger=True) == "1200"
    assert instructions.terms("add", 3, 4, 5) == ["3", "7", "11", "15", "19"]
    assert instructions.terms("add", 50, -12, 5) == ["50", "38", "26", "14", "2"]
    assert instructions.terms("multiply", 2, 3, 5) == ["2", "6", "18", "54", "162"]
    assert instructions.terms("square", 3, 1, 5) == ["9", "16", "25", "36", "49"]
    assert instructions.terms("letter", 1, 2, 5) == ["B", "D", "F", "H", "J"]
    assert instructions.shift(instructions.DAYS, "Monday", 3) == "Thursday"
    assert instructions.shift(instructions.DAYS, "Friday", 20) == "Thursday"
    assert instructions.shift(instructions.DAYS, "Tuesday", -9) == "Sunday"
    assert instructions.shift(instructions.MONTHS, "November", 3) == "February"
    assert instructions.shift(instructions.MONTHS, "March", -5) == "October"
    assert instructions.as_question("the train", "is", "late") == "Is the train late?"
    assert instructions.as_question("Maya", "has", "seen the film") == "Has Maya seen the film?"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("  The Sun. ", "sun"), ("Bogota", "bogota"), ("Bogotá", "bogota"), ("**Paris**", "paris"),
     ("Is Maya at home?", "is maya at home"), ("An  animal", "animal"), ("3.5", "3.5"), ("Theses", "theses")],
)
def test_instruction_normalise(text, expected):
    assert instructions.normalise(text) == expected


def test_instruction_extract_and_alternatives(pools):
    assert instructions.extract_answer("Paris\nIt is in the north of France.") == "paris"
    assert instructions.extract_answer("\n\n  Mice. \n") == "mice"
    assert instructions.extract_answer("") == ""
    items = every(pools, instructions)
    with_also = [i for i in items if i.answer_text in instructions.ALSO]
    assert with_also
    for item in with_also:
        assert instructions.accuracy([instructions.ALSO[item.answer_text][0]], [item]) == 1.0
    convert = next(i for i in items if i.category == "convert" and int(i.answer_text) >= 1000)
    unit = re.search(r"How many ([a-z]+) are|to ([a-z]+)\.$|how many ([a-z]+)\?$", convert.question)
    unit = next(g for g in unit.groups() if g)
    for response in (f"{int(convert.answer_text):,}", f"{convert.answer_text} {unit}.", f"{convert.answer_text} bananas"):
        assert instructions.accuracy([response], [convert]) == (not response.endswith("bananas"))
    shouted = [i.answer_text.upper() for i in items]
    assert instructions.accuracy(shouted, items) == 1.0
