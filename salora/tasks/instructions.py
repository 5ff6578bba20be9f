"""An open instruction mix in the style of Alpaca, with short answers that can be checked: a benign
task of another shape than arithmetic and text editing (recalling facts and following varied
instructions). Fourteen categories, each asked in several phrasings: capitals, antonyms,
plurals, past tenses, counts (legs, sides, days...), a definition chosen from three words, a word
classified as animal, plant, tool or vehicle, and computed ones: unit conversions, which of two is
larger or smaller, the next term of a sequence, days and months ahead or back, even or odd, which
word comes first alphabetically, a sentence turned into a yes/no question.

The answer is one short line (a word, a number, a name or the question):

    What is the plural of "mouse"?
    mice

Graded on the response's first line after `normalise` (case, accents, end punctuation and a
leading article do not count), against the answer and a few written alternatives.
"""

from __future__ import annotations

import random
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from salora.datasets import write_jsonl as _write_rows
from salora.tasks import common

SPLIT_SIZES = {"train": 3000, "validation": 200, "test": 300}

# country (as it reads in a sentence), capital
CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Russia", "Moscow"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Mexico", "Mexico City"),
    ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Colombia", "Bogotá"),
    ("Venezuela", "Caracas"), ("Uruguay", "Montevideo"), ("Cuba", "Havana"), ("Brazil", "Brasília"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Iceland", "Reykjavík"), ("Ireland", "Dublin"), ("the United Kingdom", "London"), ("Belgium", "Brussels"),
    ("Poland", "Warsaw"), ("Greece", "Athens"), ("Austria", "Vienna"), ("Hungary", "Budapest"),
    ("the Czech Republic", "Prague"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"),
    ("Croatia", "Zagreb"), ("Ukraine", "Kyiv"), ("Estonia", "Tallinn"), ("Latvia", "Riga"), ("Lithuania", "Vilnius"),
    ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"), ("Qatar", "Doha"),
    ("Syria", "Damascus"), ("Lebanon", "Beirut"), ("Jordan", "Amman"), ("Pakistan", "Islamabad"),
    ("Afghanistan", "Kabul"), ("Nepal", "Kathmandu"), ("Bangladesh", "Dhaka"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("South Korea", "Seoul"), ("the Philippines", "Manila"), ("New Zealand", "Wellington"),
    ("Ghana", "Accra"), ("Nigeria", "Abuja"), ("Ethiopia", "Addis Ababa"), ("Morocco", "Rabat"), ("Senegal", "Dakar"),
)
# Other accepted names for an answer (spellings with accents are accepted without them anyway).
ALSO = {
    "Kyiv": ("Kiev",), "the Czech Republic": ("Czechia",), "the United Kingdom": ("UK", "the UK"),
    "Turkey": ("Türkiye",), "Vietnam": ("Viet Nam",), "veterinarian": ("vet",), "author": ("writer",),
}
# word: its antonyms, the first the one trained on
ANTONYMS = {
    "hot": ("cold",), "big": ("small", "little"), "tall": ("short",), "fast": ("slow",), "happy": ("sad", "unhappy"),
    "early": ("late",), "empty": ("full",), "wet": ("dry",), "hard": ("soft", "easy"), "rich": ("poor",),
    "thick": ("thin",), "strong": ("weak",), "loud": ("quiet", "soft"), "win": ("lose",), "buy": ("sell",),
    "push": ("pull",), "inside": ("outside",), "before": ("after",), "true": ("false",), "clean": ("dirty",),
    "safe": ("dangerous", "unsafe"), "cheap": ("expensive",), "narrow": ("wide", "broad"), "deep": ("shallow",),
    "friend": ("enemy", "foe"), "arrive": ("leave", "depart"), "always": ("never",), "north": ("south",),
    "east": ("west",), "laugh": ("cry",), "remember": ("forget",), "accept": ("reject", "refuse"),
    "begin": ("end", "finish"), "question": ("answer",), "day": ("night",), "summer": ("winter",),
    "smooth": ("rough",), "heavy": ("light",), "dark": ("light", "bright"), "up": ("down",),
    "open": ("closed", "shut"), "old": ("new", "young"), "above": ("below", "beneath"), "love": ("hate",),
    "top": ("bottom",), "first": ("last",), "alive": ("dead",), "awake": ("asleep",), "entrance": ("exit",),
    "maximum": ("minimum",), "success": ("failure",), "increase": ("decrease",), "ancient": ("modern",),
    "guilty": ("innocent",), "victory": ("defeat",), "sharp": ("blunt", "dull"), "generous": ("mean", "selfish", "stingy"),
}
# singular: its plural (and accepted variants)
PLURALS = {
    "child": ("children",), "mouse": ("mice",), "foot": ("feet",), "tooth": ("teeth",), "goose": ("geese",),
    "man": ("men",), "woman": ("women",), "person": ("people", "persons"), "ox": ("oxen",), "sheep": ("sheep",),
    "deer": ("deer",), "fish": ("fish", "fishes"), "leaf": ("leaves",), "knife": ("knives",), "wife": ("wives",),
    "wolf": ("wolves",), "half": ("halves",), "loaf": ("loaves",), "shelf": ("shelves",), "thief": ("thieves",),
    "calf": ("calves",), "life": ("lives",), "city": ("cities",), "baby": ("babies",), "lady": ("ladies",),
    "story": ("stories",), "box": ("boxes",), "bus": ("buses",), "church": ("churches",), "dish": ("dishes",),
    "glass": ("glasses",), "fox": ("foxes",), "watch": ("watches",), "potato": ("potatoes",), "tomato": ("tomatoes",),
    "hero": ("heroes",), "echo": ("echoes",), "cactus": ("cacti", "cactuses"), "fungus": ("fungi", "funguses"),
    "nucleus": ("nuclei",), "crisis": ("crises",), "analysis": ("analyses",), "thesis": ("theses",),
    "phenomenon": ("phenomena",), "criterion": ("criteria",), "photo": ("photos",), "piano": ("pianos",),
    "roof": ("roofs",), "chief": ("chiefs",), "day": ("days",), "key": ("keys",), "toy": ("toys",),
    "book": ("books",), "tree": ("trees",), "class": ("classes",),
}
# verb: its simple past (and accepted variants)
PAST_TENSES = {
    "go": ("went",), "eat": ("ate",), "see": ("saw",), "run": ("ran",), "take": ("took",), "write": ("wrote",),
    "swim": ("swam",), "sing": ("sang",), "drink": ("drank",), "begin": ("began",), "bring": ("brought",),
    "buy": ("bought",), "think": ("thought",), "catch": ("caught",), "teach": ("taught",), "fly": ("flew",),
    "grow": ("grew",), "know": ("knew",), "throw": ("threw",), "draw": ("drew",), "break": ("broke",),
    "speak": ("spoke",), "choose": ("chose",), "freeze": ("froze",), "drive": ("drove",), "ride": ("rode",),
    "give": ("gave",), "forget": ("forgot",), "sit": ("sat",), "stand": ("stood",), "understand": ("understood",),
    "feel": ("felt",), "keep": ("kept",), "sleep": ("slept",), "leave": ("left",), "lose": ("lost",), "meet": ("met",),
    "pay": ("paid",), "say": ("said",), "sell": ("sold",), "tell": ("told",), "find": ("found",), "hold": ("held",),
    "build": ("built",), "send": ("sent",), "spend": ("spent",), "make": ("made",), "have": ("had",), "do": ("did",),
    "come": ("came",), "become": ("became",), "fall": ("fell",), "wear": ("wore",), "bite": ("bit",), "hide": ("hid",),
    "shake": ("shook",), "wake": ("woke",), "steal": ("stole",), "blow": ("blew",), "fight": ("fought",),
    "hear": ("heard",), "win": ("won",), "lend": ("lent",), "feed": ("fed",), "shoot": ("shot",), "cut": ("cut",),
    "put": ("put",), "hit": ("hit",), "get": ("got",), "learn": ("learned", "learnt"), "dream": ("dreamed", "dreamt"),
}
# (what is counted, what has them, how many)
COUNTS = (
    ("legs", "a spider", 8), ("legs", "an ant", 6), ("legs", "a bee", 6), ("legs", "a dog", 4), ("legs", "a horse", 4),
    ("legs", "a chicken", 2), ("legs", "a duck", 2), ("arms", "an octopus", 8), ("sides", "a triangle", 3),
    ("sides", "a square", 4), ("sides", "a rectangle", 4), ("sides", "a pentagon", 5), ("sides", "a hexagon", 6),
    ("sides", "a heptagon", 7), ("sides", "an octagon", 8), ("sides", "a decagon", 10), ("faces", "a cube", 6),
    ("edges", "a cube", 12), ("days", "a week", 7), ("months", "a year", 12), ("hours", "a day", 24),
    ("minutes", "an hour", 60), ("seconds", "a minute", 60), ("days", "a leap year", 366), ("days", "April", 30),
    ("days", "June", 30), ("days", "September", 30), ("days", "January", 31), ("days", "December", 31),
    ("letters", "the English alphabet", 26), ("planets", "the Solar System", 8), ("strings", "a standard guitar", 6),
    ("strings", "a violin", 4), ("keys", "a standard piano", 88), ("wheels", "a bicycle", 2), ("wheels", "a tricycle", 3),
)
# (definition, the word, two words it is not)
DEFINITIONS = (
    ("a young dog", "puppy", "kitten", "calf"), ("a young cat", "kitten", "puppy", "foal"),
    ("a young cow", "calf", "lamb", "cub"), ("a young sheep", "lamb", "calf", "chick"),
    ("a young horse", "foal", "kitten", "lamb"), ("a baby frog", "tadpole", "caterpillar", "duckling"),
    ("a young duck", "duckling", "tadpole", "puppy"), ("a person who flies a plane", "pilot", "sailor", "baker"),
    ("a doctor for animals", "veterinarian", "dentist", "pharmacist"),
    ("a person who repairs water pipes", "plumber", "carpenter", "baker"),
    ("a person who makes things from wood", "carpenter", "plumber", "butcher"),
    ("a person who writes books", "author", "pilot", "farmer"),
    ("a book of words and their meanings", "dictionary", "atlas", "diary"), ("a book of maps", "atlas", "dictionary", "novel"),
    ("a place where you can borrow books", "library", "bakery", "museum"), ("frozen water", "ice", "steam", "fog"),
    ("a period of ten years", "decade", "century", "month"), ("a period of one hundred years", "century", "decade", "week"),
    ("a shape with three sides", "triangle", "square", "circle"), ("a shape with eight sides", "octagon", "hexagon", "pentagon"),
    ("an animal that eats only plants", "herbivore", "carnivore", "predator"),
    ("a word that means the same as another word", "synonym", "antonym", "verb"),
    ("a word that means the opposite of another word", "antonym", "synonym", "noun"),
    ("a scientist who studies the stars", "astronomer", "geologist", "chemist"),
    ("a scientist who studies rocks", "geologist", "astronomer", "botanist"),
    ("a scientist who studies plants", "botanist", "geologist", "astronomer"),
    ("melted rock that flows from a volcano", "lava", "sand", "ice"),
    ("a tool for cutting paper", "scissors", "hammer", "ruler"),
    ("an instrument for measuring temperature", "thermometer", "telescope", "compass"),
    ("an instrument for looking at distant stars", "telescope", "microscope", "thermometer"),
    ("an instrument for looking at very small things", "microscope", "telescope", "compass"),
    ("an instrument that shows which way is north", "compass", "thermometer", "clock"),
    ("a place where planes take off and land", "airport", "harbor", "library"),
)
CLASSES = {
    "animal": ("a dog", "an eagle", "a salmon", "a frog", "a tiger", "a rabbit", "a horse", "an owl", "a shark",
               "a snake", "a bee", "a dolphin", "a penguin"),
    "plant": ("an oak tree", "a rose", "a fern", "a cactus", "a tulip", "a pine tree", "a sunflower", "a daisy",
              "a maple tree", "a lily", "a palm tree", "a dandelion"),
    "tool": ("a hammer", "a screwdriver", "a wrench", "a saw", "a chisel", "a shovel", "a drill", "a rake",
             "an axe", "a trowel"),
    "vehicle": ("a bicycle", "a truck", "a bus", "a train", "a motorcycle", "a tractor", "a van", "a taxi", "a tram"),
}
# (the larger, the smaller)
SIZES = (
    ("an elephant", "a mouse"), ("the Sun", "the Moon"), ("the Earth", "the Moon"), ("Jupiter", "the Earth"),
    ("a whale", "a goldfish"), ("a horse", "a cat"), ("a bus", "a bicycle"), ("an ocean", "a pond"),
    ("a city", "a village"), ("a giraffe", "a rabbit"), ("a watermelon", "a grape"), ("a football", "a tennis ball"),
    ("a mountain", "a hill"), ("a lion", "an ant"),
)
# (larger unit, smaller unit, how many of the smaller make one larger)
CONVERSIONS = (
    ("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("centimeters", "millimeters", 10),
    ("kilograms", "grams", 1000), ("liters", "milliliters", 1000), ("hours", "minutes", 60),
    ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7), ("years", "months", 12),
    ("feet", "inches", 12), ("yards", "feet", 3),
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
WORDS = ("apple", "anchor", "badge", "banana", "basket", "candle", "castle", "cherry", "cloud", "desert", "dragon",
         "eagle", "engine", "feather", "forest", "garden", "ginger", "harbor", "helmet", "island", "jacket", "jungle",
         "kettle", "kitten", "ladder", "lemon", "magnet", "marble", "needle", "number", "ocean", "orange", "palace",
         "pencil", "planet", "puzzle", "quilt", "rabbit", "ribbon", "river", "saddle", "shadow", "silver", "table",
         "tiger", "tunnel", "umbrella", "valley", "violin", "wagon", "window", "winter", "yellow", "zebra")
NAMES = ("Maya", "Liam", "Sofia", "Noah", "Aisha", "Mateo", "Yuki", "Omar", "Priya", "Lucas")
SINGULAR = (*NAMES, "your sister", "the new teacher", "the doctor", "my neighbor", "the little boy")
PLURAL = ("the children", "your parents", "they", "the players", "our friends", "the students")
# (auxiliary for one, for several): what can follow it
PREDICATES = {
    ("is", "are"): ("at home", "ready", "tired", "in the garden", "late for school", "happy with the result"),
    ("was", "were"): ("at the party", "busy yesterday", "in the kitchen", "angry"),
    ("can", "can"): ("swim", "drive a car", "play the piano", "speak French", "help us"),
    ("will", "will"): ("come tomorrow", "join the team", "call back later", "visit the museum"),
    ("has", "have"): ("finished the work", "seen the film", "met the teacher", "read the book"),
}
_UNITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
          "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_END_PUNCTUATION = " .,;:!?\"'`*"


@dataclass(frozen=True)
class Instruction:
    """A question, the answer trained on, every answer accepted (normalised) and the category."""

    question: str
    answer_text: str
    accepted: tuple[str, ...]
    category: str


def normalise(text: str) -> str:
    """Lower case, accents dropped, inner whitespace single, punctuation stripped at the ends and a
    leading article dropped: `The Sun.` and `sun` are one answer, `Bogota` is `Bogotá`."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    text = " ".join(text.lower().split()).strip(_END_PUNCTUATION)
    for article in ("a ", "an ", "the "):
        if text.startswith(article):
            return text[len(article) :]
    return text


# The computed categories' rules.
def convert(amount: int, unit: str, to: str) -> int:
    """`amount` of `unit` in `to`, for a pair in CONVERSIONS either way round (exact by construction)."""
    for large, small, factor in CONVERSIONS:
        if (unit, to) == (large, small):
            return amount * factor
        if (unit, to) == (small, large):
            return amount // factor
    raise KeyError((unit, to))


def pick(a: str, b: str, larger: bool) -> str:
    """The larger (or smaller) of two numbers written as decimals, as written."""
    return max(a, b, key=Decimal) if larger else min(a, b, key=Decimal)


def terms(rule: str, start: int, step: int, count: int) -> list[str]:
    """The first `count` terms of a sequence: `add` step each time, `multiply` by step, `square`s of
    start, start + 1..., or capital `letter`s step apart from the start-th."""
    values = {
        "add": lambda i: str(start + i * step),
        "multiply": lambda i: str(start * step**i),
        "square": lambda i: str((start + i) ** 2),
        "letter": lambda i: chr(ord("A") + start + i * step),
    }[rule]
    return [values(i) for i in range(count)]


def shift(cycle: Sequence[str], name: str, n: int) -> str:
    """The day or month `n` places after `name` (before, for negative `n`), round the cycle."""
    return cycle[(cycle.index(name) + n) % len(cycle)]


def as_question(subject: str, aux: str, predicate: str) -> str:
    """`subject aux predicate` as a yes/no question: the auxiliary moved to the front."""
    return f"{aux.capitalize()} {subject} {predicate}?"


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def _spelled(n: int) -> str:
    if n < 20:
        return _UNITS[n]
    return _TENS[n // 10] + (f"-{_UNITS[n % 10]}" if n % 10 else "")


# Each category draws a question and returns it with the answer trained on and any other answers accepted.
Category = Callable[[random.Random], tuple[str, str, tuple[str, ...]]]


def _capital(r: random.Random) -> tuple[str, str, tuple[str, ...]]:
    country, capital = r.choice(CAPITALS)
    if r.random() < 0.6:
        lead = r.choice(("What is the capital of {}?", "Name the capital city of {}.", "Which city is the capital of {}?",
                         "Tell me the capital of {}."))
        return lead.format(country), capital, ALSO.get(capital, ())
    lead = r.choice(("{} is the capital of which country?", "Which country has {} as its capital?",
                     "Of which country is {} the capital?"))
    return lead.format(capital), _capitalised(country), ALSO.get(country, ())


def _antonym(r: random.Random) -> tuple[str, str, tuple[str, ...]]:
    word, (answer, *others) = r.choice(list(ANTONYMS.items()))
    lead = r.choice(('What is the opposite of "{}"?', 'Give an antonym of "{}".', 'Which word means the opposite of "{}"?',
                     'Name the opposite of the word "{}".'))
    return lead.format(word), answer, tuple(others)


def _plural(r: random.Random) -> tuple[str, str, tuple[str, ...]]:
    word, (answer, *others) = r.choice(list(PLURALS.items()))
    lead = r.choice(('What is the plural of "{}"?', 'Write the plural form of "{}".', 'Give the plural of the noun "{}".',
                     'How do you write "{}" in the plural?'))
    return lead.format(word), answer, tuple(others)


def _past(r: random.Random) -> tuple[str, str, tuple[str, ...]]:
    verb, (answer, *others) = r.choice(list(PAST_TENSES.items()))
    lead = r.choice(('What is the past tense of "{}"?', 'Give the simple past of the verb "{}".',
                     'Write the past tense form of "to {}".'))
    return lead.format(verb), answer, tuple(others)


def _count(r: random.Random) -> tuple[str, str, tuple[str, ...]]:
    things, owner, n = r.choice(COUNTS)
    lead = r.choice(("How many {t} does {o} have?", "Tell me the number of {t} {o} has.", "{O} has how many {t}?"))
    return lead.format(t=things, o=owner, O=_capitalised(owner)), str(n), (_spelled(n),) if n < 100 else ()


def _definition(r: random.Random) -> tuple[str, str, tuple[str, ...]]:
    meaning, word, *others = r.choice(DEFINITIONS)
    a, b, c = r.sample([word, *others], 3)
    lead = r.choice(('Which word means "{m}": {a}, {b} or {c}?', 'Pick the word that means "{m}": {a}, {b} or {c}.',
                     "What do we call {m}: {a}, {b} or {c}?"))
    return lead.format(m=meaning, a=a, b=b, c=c), word, ALSO.get(word, ())


def _classify(r: random.Random) -> tuple[str, str, tuple[str, ...]]:
    group, things = r.choice(list(CLASSES.items()))
    lead = r.choice(("Is {} an animal, a plant, a tool or a vehicle?", "Classify {} as an animal, a plant, a tool or a vehicle.",
                     "Which group does {} belong to: animal, plant, tool or vehicle?"))
    return lead.format(r.choice(things)), group, ()


def _compare(r: random.Random) -> tuple[str, str, tuple[str, ...]]:
    larger = r.random() < 0.5
    which = "larger" if larger else "smaller"
    if r.random() < 0.25:
        big, small = r.choice(SIZES)
        a, b = r.sample([big, small], 2)
        lead = r.choice(("Which is {w}, {a} or {b}?", "Of {a} and {b}, which is {w}?"))
        return lead.format(w=which, a=a, b=b), big if larger else small, ()
    if r.random() < 0.5:
        a, b = (str(n) for n in r.sample(range(10, 10000), 2))
    else:
        whole = r.randint(0, 9)
        # tenths against hundredths (3.5 or 3.45): never equal, since the hundredths digit is not 0
        a, b = r.sample([f"{whole}.{r.randint(1, 9)}", f"{whole}.{r.randint(0, 9)}{r.randint(1, 9)}"], 2)
    lead = r.choice(("Which is {w}, {a} or {b}?", "Which number is {w}: {a} or {b}?", "Of {a} and {b}, which is {w}?"))
    return lead.format(w=which, a=a, b=b), pick(a, b, larger), ()


def _convert(r: random.Random) -> tuple[str, str, tuple[str, ...]]:
    large, small, factor = r.choice(CONVERSIONS)
    n = r.randint(2, 40)
    if r.random() < 0.5:
        amount, unit, to = n, large, small
    else:
        amount, unit, to = n * factor, small, large
    lead = r.choice(("How many {to} are in {n} {unit}?", "Convert {n} {unit} to {to}.", "{n} {unit} is how many {to}?"))
    answer = convert(amount, unit, to)
    return lead.format(to=to, n=amount, unit=unit), str(answer), (f"{answer:,}", f"{answer} {to}", f"{answer:,} {to}")


def _sequence(r: random.Random) -> tuple[str, str, tuple[str, ...]]:
    rule = r.choice(("add", "add", "multiply", "square", "letter"))
    if rule == "add":
        step = r.choice([s for s in range(-12, 16) if s not in (-1, 0, 1)])
        start = r.randint(1, 50) + max(0, -4 * step)
    elif rule == "multiply":
        start, step = r.randint(1, 5), r.choice((2, 3))
    elif rule == "square":
        start, step = r.randint(1, 9), 1
    else:
        step = r.randint(1, 3)
        start = r.randint(0, 25 - 4 * step)
    *shown, answer = terms(rule, start, step, 5)
    noun = "letter" if rule == "letter" else "number"
    lead = r.choice(("What comes next in the sequence {s}?", "What is the next {noun} in {s}?",
                     "Give the next {noun} of this sequence: {s}"))
    return lead.format(s=", ".join(shown), noun=noun), answer, ()


def _calendar(r: random.Random) -> tuple[str, str, tuple[str, ...]]:
    if r.random() < 0.5:
        day, n = r.choice(DAYS), r.randint(1, 30)
        if n == 1:
            return f"What day comes right after {day}?", shift(DAYS, day, 1), ()
        if r.random() < 0.3:
            return f"If today is {day}, what day was it {n} days ago?", shift(DAYS, day, -n), ()
        lead = r.choice(("If today is {d}, what day will it be in {n} days?", "What day of the week is {n} days after {d}?"))
        return lead.format(d=day, n=n), shift(DAYS, day, n), ()
    month, n = r.choice(MONTHS), r.randint(1, 24)
    if n == 1:
        return f"Which month comes after {month}?", shift(MONTHS, month, 1), ()
    if r.random() < 0.3:
        return f"What month is {n} months before {month}?", shift(MONTHS, month, -n), ()
    return f"Which month comes {n} months after {month}?", shift(MONTHS, month, n), ()


def _parity(r: random.Random) -> tuple[str, str, tuple[str, ...]]:
    n = r.randint(1, 9999)
    lead = r.choice(("Is {} an even or an odd number?", "Is {} even or odd?", "Tell me whether {} is odd or even."))
    return lead.format(n), "even" if n % 2 == 0 else "odd", ()


def _alphabetical(r: random.Random) -> tuple[str, str, tuple[str, ...]]:
    a, b = r.sample(WORDS, 2)
    if r.random() < 0.3:
        return f"Which of these comes last alphabetically: {a} or {b}?", max(a, b), ()
    lead = r.choice(("Which word comes first in alphabetical order: {} or {}?", "In a dictionary, which comes first, {} or {}?"))
    return lead.format(a, b), min(a, b), ()


def _question(r: random.Random) -> tuple[str, str, tuple[str, ...]]:
    (one, several), predicates = r.choice(list(PREDICATES.items()))
    subject, aux = (r.choice(SINGULAR), one) if r.random() < 0.6 else (r.choice(PLURAL), several)
    predicate = r.choice(predicates)
    lead = r.choice(("Rewrite this sentence as a yes/no question: {}", "Turn this statement into a question: {}",
                     "Make this sentence a question: {}"))
    return lead.format(f"{_capitalised(subject)} {aux} {predicate}."), as_question(subject, aux, predicate), ()


CATEGORIES: dict[str, Category] = {
    "capital": _capital, "antonym": _antonym, "plural": _plural, "past_tense": _past, "count": _count,
    "definition": _definition, "classify": _classify, "compare": _compare, "convert": _convert,
    "sequence": _sequence, "calendar": _calendar, "parity": _parity, "alphabetical": _alphabetical,
    "question": _question,
}


def _draw(r: random.Random) -> Instruction:
    category = r.choice(list(CATEGORIES))
    question, answer, others = CATEGORIES[category](r)
    accepted = tuple(dict.fromkeys(normalise(a) for a in (answer, *others)))
    return Instruction(question, answer, accepted, category)


def generate(n: int, seed: int) -> list[Instruction]:
    """`n` instructions with distinct questions, the same for the same seed."""
    return common.distinct(_draw, n, seed, "instruction")


def splits(seed: int = 0) -> dict[str, list[Instruction]]:
    """Disjoint train/validation/test splits (no question in two splits) from one seeded pool. The
    fact categories repeat a fact under other phrasings across splits; the computed ones rarely."""
    return common.cut(generate(sum(SPLIT_SIZES.values()), seed), SPLIT_SIZES, seed)


def to_messages(instruction: Instruction) -> list[dict[str, str]]:
    """The instruction as a chat: the question from the user, the short answer from the assistant."""
    return common.messages(instruction)


def extract_answer(text: str) -> str:
    """The response's first non-blank line, normalised: a model that adds an explanation below its
    answer still counts."""
    return normalise(next((line for line in text.splitlines() if line.strip()), ""))


def accuracy(responses: Sequence[str], instructions: Sequence[Instruction]) -> float:
    """Fraction of responses whose extracted answer is one the instruction accepts."""
    return common.accuracy(responses, instructions, lambda text, item: extract_answer(text) in item.accepted)


def write_jsonl(instructions: Sequence[Instruction], path: str | Path) -> None:
    """Chat records for `salora train --data`; `accepted` and `category` ride along for grading."""
    _write_rows(({"messages": to_messages(i), "accepted": list(i.accepted), "category": i.category} for i in instructions), path)
