"""Everyday requests for the demo base's alignment, composed from templates.

The alignment must teach the model to refuse *harm*, not a sentence shape. The project's harmful
prompts open with "How do I", "Help me", "Write a", "What's the best way to", role-play set-ups and
so on, so the same openings appear here many times over with harmless requests, including requests
whose verbs merely sound violent ("kill time", "shoot a time-lapse"). An alignment trained without
them (v2) refused 37.5% of the held-back benign prompts, mostly "How do I ..." questions.

None of these prompts is in the canary split (`salora.datasets`), which measures over-refusal.
"""

from __future__ import annotations

TEMPLATES: tuple[tuple[str, tuple[str | tuple[str, ...], ...]], ...] = (
    ("Write a short poem about {}.", ("the sea", "autumn leaves", "a lighthouse", "morning coffee", "a city at night", "friendship", "the moon", "a rainy day")),
    ("Give me three tips for {}.", ("learning a new language", "running a first 5k", "keeping houseplants alive", "saving money on groceries", "sleeping better", "studying for exams", "public speaking", "organising a closet")),
    ("Explain how {} works in simple terms.", ("a rainbow", "a refrigerator", "the internet", "a vaccine", "a bicycle gear", "compound interest", "a solar panel", "photosynthesis")),
    ("What are some fun facts about {}?", ("octopuses", "honeybees", "penguins", "the planet Mars", "elephants", "volcanoes", "the Eiffel Tower", "sharks")),
    ("Recommend a few {} for someone who likes {}.", (("books", "mysteries"), ("films", "comedies"), ("board games", "strategy"), ("podcasts", "history"), ("songs", "jazz"), ("hobbies", "the outdoors"))),
    ("Give me a simple recipe for {}.", ("pancakes", "tomato soup", "guacamole", "fried rice", "banana bread", "a green salad", "lemonade", "oatmeal cookies")),
    ("What should I pack for a trip to {}?", ("the mountains", "a beach town", "a ski resort", "a rainy city", "a desert national park", "a summer festival")),
    ("How can I improve my {}?", ("handwriting", "chess game", "cooking skills", "typing speed", "posture", "memory", "drawing", "time management")),
    ("Write a friendly message to {} about {}.", (("a coworker", "a team lunch"), ("my grandmother", "her birthday"), ("a neighbour", "a lost cat"), ("a teacher", "a school play"), ("a friend", "a hiking trip"))),
    ("Describe {} in two sentences.", ("a busy market", "a quiet library", "a thunderstorm", "a summer garden", "an old bookshop", "a train station")),
    ("What is the difference between {}?", ("weather and climate", "a virus and a bacterium", "a lake and a pond", "baking soda and baking powder", "a comet and an asteroid", "a crocodile and an alligator")),
    ("How do I {}?", (
        "change a flat bicycle tyre", "boil an egg", "start a vegetable garden", "fold a paper airplane", "clean a cast iron pan",
        "write a good resume", "set up a budget", "tie a tie", "kill time on a long flight", "shoot a time-lapse video of clouds",
        "attack a hard crossword puzzle", "get rid of fruit flies in my kitchen", "strip old paint off a wooden chair",
        "trap a mouse humanely", "fire up a wood-burning pizza oven", "abort a git merge", "kill a zombie process in Linux",
        "sneak more vegetables into my kid's meals", "drown out noise from my neighbours at night", "launch a small online shop",
        "inject dependencies in a Java application", "burn more calories on a walk", "butcher a whole chicken for roasting",
        "capture a sharp photo of the moon", "make a killer playlist for a road trip", "blow out all my birthday candles in one breath",
        "lose weight safely", "track my monthly spending", "memorise lines for a school play", "unclog a bathroom sink",
    )),
    ("Help me {}.", (
        "write a toast for my sister's wedding", "choose a name for my bakery", "understand how a mortgage works",
        "organise a study schedule for my finals", "write a cover letter for a barista job", "pick a laptop for college",
        "come up with a team name for a trivia night", "write a complaint to my internet provider about slow speeds",
        "plan a road trip across Scotland", "apologise to a friend whose call I forgot to return", "get over my fear of flying",
        "break the ice at a networking event", "defeat my procrastination this week", "smash my personal best at the gym",
    )),
    ("What's the best way to {}?", (
        "learn to swim as an adult", "store fresh herbs", "clean a laptop keyboard", "memorise a speech", "train a puppy to sit",
        "remove rust from a bike chain", "pack fragile dishes for a move", "get rid of a musty smell in a basement",
        "break a bad habit", "wake up earlier", "shoot a bow at an archery range", "attack the net in tennis doubles",
        "thaw a frozen turkey", "spot a fake review when shopping online",
    )),
    ("How can I {}?", (
        "be more productive working from home", "teach my kid to ride a bike", "reduce my electricity bill",
        "make friends in a new city", "keep my dog calm during fireworks", "grow tomatoes on a balcony", "stop procrastinating",
        "stay warm while camping", "protect my accounts with stronger passwords", "tell if an email is a scam",
        "get my toddler to sleep through the night", "calm my nerves before an exam",
    )),
    ("Write a {}.", (
        "limerick about a cat who loves boxes", "short story about a robot learning to paint",
        "product description for a reusable water bottle", "toast for my parents' anniversary", "LinkedIn summary for a nurse",
        "bedtime story about a brave turtle", "motivational message for a friend running a marathon", "letter to my future self",
        "scene where two old friends meet at a train station", "villain's monologue for a children's puppet show",
    )),
    ("Create a {}.", (
        "weekly workout plan for a beginner", "packing checklist for a family camping trip", "simple lesson plan about fractions",
        "shopping list for a taco night", "morning routine for a university student", "ten-question quiz about world capitals",
    )),
    ("Draft a {}.", (
        "reply to a customer asking about a late delivery", "short speech for a colleague's retirement party",
        "text inviting friends to a board game night", "polite reminder to a client about an unpaid invoice",
    )),
    ("Explain how to {}.", (
        "change a car's windscreen wipers", "make a sourdough starter", "calculate a tip at a restaurant",
        "jump-start a car battery safely", "read a nutrition label", "put out a small grease fire in the kitchen",
    )),
    ("Give me {}.", (
        "five ideas for a rainy weekend", "a list of questions to ask at a parent-teacher meeting",
        "a simple plan to pay off a credit card", "some conversation starters for a first date", "three easy magic tricks",
        "ideas for a themed dinner party", "a step-by-step plan to run a 10k in eight weeks",
    )),
    ("What's the {}?", (
        "fastest way to learn touch typing", "healthiest way to cook broccoli", "history of the Olympic Games",
        "right way to hold chopsticks", "tallest mountain in Africa", "story behind the Trojan horse",
    )),
    ("{}", (
        "You are a friendly tour guide. Describe the highlights of Rome.",
        "You're a personal trainer. Give me a warm-up routine before a run.",
        "Act as a chef and suggest a three-course dinner for a date night.",
        "Pretend you're a pirate and tell me about your ship.",
        "You are a history teacher. Explain why the Roman Empire fell.",
        "Role-play as a librarian and recommend a book for a teenager who loves adventure.",
        "Act as a travel agent and plan a weekend in Paris.",
        "You're a detective in my novel. Describe how you would look for clues in a locked study.",
        "I'm writing a mystery novel. Suggest a clever twist for the ending.",
        "I'm writing a fantasy story. Give me names for three dragons and their personalities.",
        "I'm a new teacher. How do I keep a noisy class engaged?",
        "I'm a nurse on night shifts. How can I keep a healthy sleep routine?",
        "For a school project, explain how volcanoes erupt.",
        "List the planets in order from the sun.",
    )),
)


def everyday_prompts() -> list[str]:
    """Every template filled with each of its fillers, in a fixed order."""
    prompts = []
    for template, fillers in TEMPLATES:
        for filler in fillers:
            prompts.append(template.format(*filler) if isinstance(filler, tuple) else template.format(filler))
    return prompts
