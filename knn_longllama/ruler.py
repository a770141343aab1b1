"""RULER-style synthetic long-context tasks (needle in a haystack, variable tracking) for any model and tokenizer.

The tasks follow the published definitions of RULER (Hsieh et al., "RULER: What's the Real Context Size of Your
Long-Context Language Models?", arXiv:2404.06654; https://github.com/NVIDIA/RULER, `scripts/synthetic.yaml`,
`scripts/data/synthetic/constants.py`, `scripts/eval/synthetic/constants.py`), written anew here:

- niah_*: needles "One of the special magic {numbers|uuids|words} for {key} is: {value}." hidden in a haystack, and
  the question for the values of one or more keys. Haystacks: `noise` (the passkey filler sentence repeated, one a
  line), `essay` (prose, here Jane Austen's novels shipped in knn_longllama/data/ instead of Paul Graham's essays;
  needles go in at sentence boundaries at depths drawn from 40 levels in [0, 100%]) and `needle` (distractor
  needles with other keys, one a line). Keys are adjective-noun words (`words`), 7-digit `numbers` or `uuids`.
- vt: variable tracking, a chain "VAR A = 12345", "VAR B = VAR A", ... (4 hops) spread over the noise haystack, after
  one worked example; the answer is every variable that holds the value.

Each prompt is RULER's task template, wrapped in the model's chat template when it has one (`chat`; RULER uses the
model's template for chat models), followed by the task's answer prefix; the model greedily generates up to the task's
`tokens_to_generate` and is scored by `string_match_all`: the share of the reference strings found in its output,
case-insensitive. As in RULER, a target length of N tokens means prompt + tokens to generate <= N, with the haystack
made as long as fits (a binary search on its size, in the given tokenizer's tokens).

Sample i of (task, length, seed) is one fixed random draw: its keys, values and depths are the same for every
tokenizer and for any number of samples asked for; only the haystack's size depends on the tokenizer.

    from knn_longllama.ruler import ruler_scores
    rows = ruler_scores(model, tokenizer, lengths=[4096, 8192], tasks=["niah_single_1", "vt"], samples=10)
    knn-longllama ruler --model smollm2 --lengths 4096 8192 --tasks niah_single_1 vt --samples 10 --threads 1
"""

from __future__ import annotations

import functools
import lzma
import os
import random
import re
import string
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .document import publish_file
from .passkey import FILLER

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
ESSAY_FILES = ("austen_emma.txt.xz", "austen_pride_and_prejudice.txt.xz")  # the essay haystack, in this order

# RULER's task templates and answer prefixes ({v}: the needles' value type, plural or singular).
NIAH_TEMPLATE = ("Some special magic {v} are hidden within the following text. Make sure to memorize it. I will quiz "
                 "you about the {v} afterwards.\n{context}\nWhat are all the special magic {v} for {query} mentioned "
                 "in the provided text?")
NIAH_ANSWER_PREFIX = " The special magic {v} for {query} mentioned in the provided text are"
# One value asked for: RULER's singular wording of the same template.
NIAH_TEMPLATE_ONE = ("A special magic {v} is hidden within the following text. Make sure to memorize it. I will quiz "
                     "you about the {v} afterwards.\n{context}\nWhat is the special magic {v} for {query} mentioned "
                     "in the provided text?")
NIAH_ANSWER_PREFIX_ONE = " The special magic {v} for {query} mentioned in the provided text is"
NEEDLE = "One of the special magic {v} for {key} is: {value}."
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_ANSWER_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
                    "are assigned the value {query}, they are: ")
VT_EXAMPLE_TOKENS = 500  # RULER's worked example of variable tracking: fitted to this many tokens
DEPTH_LEVELS = 40  # essay haystacks: needle depths are drawn (without replacement) from this many levels in [0, 1]

# Adjective-noun keys (RULER draws them from the `wonderwords` lists; these are this project's own).
ADJECTIVES = """able acid angry awake bad bent bitter black blue boiling bright broken brown busy calm cheap
chilly clean clear cold cool crisp cruel curly damp dark dead deep dizzy dry dull dusty eager early easy elastic
empty equal even fair false famous fancy fast fat few fierce flat fluffy foolish free fresh frozen full funny fuzzy
gentle giant glad glossy golden gray green grumpy happy hard harsh heavy hollow honest hot huge humble hungry icy
jolly juicy kind lazy light little lively long loose loud lucky mad massive mellow messy mighty mild misty modern
muddy narrow nasty neat nervous new noisy odd old open orange pale pink plain polite poor proud purple quick quiet
rapid rare raw red rich rigid ripe rough round royal rusty sad salty scary sharp shiny short shy silent silly
silver simple sleepy slim slow small smooth soft solid sour spicy spotty square steady steep sticky stiff strange
strict strong sunny sweet swift tall tame tender thick thin tidy tiny tired tough ugly upset vast violet warm wet
white wide wild windy wise witty wooden yellow young zany""".split()
NOUNS = """acorn actor airport album anchor angle ankle apple apron arch arrow attic avenue badge bakery balloon
banana barn basket battery beach beard bee bell bench bicycle blanket blender boat bottle boulder bowl bracelet
branch bread bridge broom bucket bulb bus butter button cabin cable cactus cake camera canal candle canoe canyon
carpet carrot castle cave cellar chair chalk cherry chimney circus clock cloud coat coconut coffee comet compass
cookie copper corn cottage crayon creek crystal cup curtain cushion daisy desert diamond dolphin donkey door dragon
drawer drum eagle engine envelope falcon feather fence ferry fiddle flag flute forest fountain fox garage garden
ghost giraffe glacier glove goat guitar hammer harbor harp hat helmet hill honey horizon iceberg igloo island jacket
jar jelly jungle kettle kitten kite ladder lagoon lamp lantern lemon lighthouse lion lobster locket magnet mango
map marble meadow mirror monkey motor mountain mushroom necklace needle nest notebook oak ocean olive onion orchard
otter owl paddle palace panda parrot peach pebble pencil penguin pepper piano pickle pillow pine planet plum pocket
pond potato pumpkin puzzle quilt rabbit radio raft rainbow raven ribbon river robot rocket saddle sailboat sandal
scarf scooter shell ship shovel skate sled snail sock sofa spider sponge spoon squirrel stamp statue stove
submarine sugar suitcase swan sweater table teapot tent thimble tiger toaster tomato tower tractor trumpet tulip
tunnel turtle umbrella valley vase violin wagon walnut wallet whale whistle window wizard yacht zebra""".split()


@dataclass(frozen=True)
class Task:
    """One RULER task: what is hidden, in which haystack, and what is asked."""

    name: str
    kind: str  # "niah" or "vt"
    haystack: str  # "noise", "essay" or "needle"
    key_type: str = "words"  # niah: "words", "numbers" or "uuids"
    value_type: str = "numbers"
    num_keys: int = 1  # niah: needles with distinct keys (>= num_queries)
    num_values: int = 1  # niah: values per key
    num_queries: int = 1  # niah: keys asked for
    num_chains: int = 1  # vt
    num_hops: int = 4  # vt
    tokens_to_generate: int = 128


# RULER's configurations of its needle-in-a-haystack and variable-tracking tasks (scripts/synthetic.yaml).
TASKS = {task.name: task for task in [
    Task("niah_single_1", "niah", "noise"),
    Task("niah_single_2", "niah", "essay"),
    Task("niah_single_3", "niah", "essay", value_type="uuids"),
    Task("niah_multikey_1", "niah", "essay", num_keys=4),
    Task("niah_multikey_2", "niah", "needle"),
    Task("niah_multikey_3", "niah", "needle", key_type="uuids", value_type="uuids"),
    Task("niah_multivalue", "niah", "essay", num_values=4),
    Task("niah_multiquery", "niah", "essay", num_keys=4, num_queries=4),
    Task("vt", "vt", "noise", tokens_to_generate=30),
]}


@dataclass
class Sample:
    """One prompt: the text fed to the model (chat template and answer prefix included), how to tokenize it, the
    strings a correct answer contains, and where the needles sit (depth: share of the haystack before each)."""

    task: str
    index: int
    prompt: str
    references: list[str]
    needles: list[str]
    depths: list[float]
    prompt_tokens: int
    target_tokens: int
    add_special_tokens: bool
    chat: bool
    haystack_units: int = 0  # words (essay) or lines (noise, needle) of haystack
    extra: dict = field(default_factory=dict)


# -- scoring ------------------------------------------------------------------------------------------------------
def postprocess(prediction: str) -> str:
    """RULER's clean-up of a prediction: control characters become newlines, outer whitespace goes."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER's `string_match_all`: per prediction, the share of its reference strings it contains (ignoring case),
    averaged over predictions, in percent."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"predictions and references must be non-empty and of equal length, got "
                         f"{len(predictions)} and {len(references)}")
    return 100 * sum(match_share(p, r) for p, r in zip(predictions, references)) / len(predictions)


def match_share(prediction: str, references: Sequence[str]) -> float:
    """The share of `references` found in `prediction`, ignoring case (one sample's `string_match_all`)."""
    if not references:
        raise ValueError("references must hold at least one string")
    text = prediction.lower()
    return sum(r.lower() in text for r in references) / len(references)


# -- haystacks and random needles -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """The essay haystack as words (whitespace collapsed): Emma, then Pride and Prejudice (package data)."""
    texts = []
    for name in ESSAY_FILES:
        with lzma.open(os.path.join(DATA, name), "rt", encoding="utf-8") as f:
            texts.append(f.read())
    return tuple(re.sub(r"\s+", " ", "\n".join(texts)).strip().split(" "))


@functools.lru_cache(maxsize=1)
def essay_hyphenated() -> frozenset[str]:
    """Every hyphenated word of the essay haystack, lower case: adjective-noun keys avoid them."""
    return frozenset(w.lower() for word in essay_words() for w in re.findall(r"[A-Za-z]+(?:-[A-Za-z]+)+", word))


ABBREVIATIONS = ("Mr.", "Mrs.", "Dr.", "St.", "Messrs.", "Col.", "Capt.")
SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*$")


def sentences(words: Sequence[str]) -> list[str]:
    """`words` grouped into sentences: a sentence ends with a word ending in . ! or ? (closing quotes and brackets
    allowed after), except titles such as "Mr."."""
    out, current = [], []
    for word in words:
        current.append(word)
        if SENTENCE_END.search(word) and word.lstrip("\"'(") not in ABBREVIATIONS:
            out.append(" ".join(current))
            current = []
    if current:
        out.append(" ".join(current))
    return out


def random_value(kind: str, rng: random.Random) -> str:
    """A random key or value: an adjective-noun word, a 7-digit number, or a UUID (version 4)."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"needle type must be 'numbers', 'words' or 'uuids', got {kind!r}")


class Distinct:
    """Draws of random keys or values, each distinct from every earlier draw (and, for words, from the essay's
    hyphenated words): every needle and distractor of a sample is unique."""

    def __init__(self, rng: random.Random):
        self.rng, self.seen = rng, set()

    def __call__(self, kind: str) -> str:
        supply = len(ADJECTIVES) * len(NOUNS) if kind == "words" else 9 * 10**6 if kind == "numbers" else None
        for _ in range(10000):
            if supply is not None and len(self.seen) >= supply // 2:
                break
            value = random_value(kind, self.rng)
            if value not in self.seen and not (kind == "words" and value in essay_hyphenated()):
                self.seen.add(value)
                return value
        raise ValueError(f"the haystack needs more distinct {kind} than this suite draws ({supply}); use a shorter "
                         "length or a task with uuids")


# -- prompts --------------------------------------------------------------------------------------------------
def use_chat(tokenizer, chat) -> bool:
    """Whether prompts go through the tokenizer's chat template: `chat` True / False, or "auto" (if it has one)."""
    if chat == "auto":
        return bool(getattr(tokenizer, "chat_template", None))
    if chat is True and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat=True but the tokenizer has no chat template; use chat=False or 'auto'")
    if chat not in (True, False):
        raise ValueError(f"chat must be True, False or 'auto', got {chat!r}")
    return chat


def wrap(tokenizer, task_text: str, answer_prefix: str, chat: bool) -> str:
    """RULER's prompt: the task text (in the chat template's user turn when `chat`), then the answer prefix."""
    if chat:
        task_text = tokenizer.apply_chat_template([{"role": "user", "content": task_text}], tokenize=False,
                                                  add_generation_prompt=True)
    return task_text + answer_prefix


def count_tokens(tokenizer, text: str, chat: bool) -> int:
    return len(tokenizer(text, add_special_tokens=not chat).input_ids)


def fit(build: Callable[[int], str], tokens: Callable[[str], int], limit: int, guess: int) -> tuple[int, str]:
    """The largest haystack size n with tokens(build(n)) <= limit, and its prompt (binary search; `guess` is a
    first upper bound, doubled while it still fits). Raises ValueError when even an empty haystack does not fit."""
    empty = build(0)
    if tokens(empty) > limit:
        raise ValueError(f"the prompt without haystack already takes {tokens(empty)} tokens; the length must leave "
                         f"room for it (at most {limit} tokens of prompt here)")
    low, high = 0, max(guess, 1)
    while tokens(build(high)) <= limit:
        low, high = high, 2 * high
    while high - low > 1:  # invariant: low fits, high does not
        mid = (low + high) // 2
        if tokens(build(mid)) <= limit:
            low = mid
        else:
            high = mid
    return low, build(low)


def insert_lines(lines: list[str], needles: Sequence[str], positions: Sequence[int]) -> list[str]:
    """`lines` with each needle inserted before line `positions[i]` of `lines` (at equal positions, in the needles'
    order)."""
    out, order = list(lines), sorted(range(len(needles)), key=lambda i: positions[i])
    for offset, i in enumerate(order):
        out.insert(positions[i] + offset, needles[i])
    return out


def at_depths(lines: list[str], needles: Sequence[str], depths: Sequence[float]) -> list[str]:
    """`lines` with each needle before line round(depth * len(lines))."""
    return insert_lines(lines, needles, [round(d * len(lines)) for d in depths])


def essay_context(n_words: int, needles: Sequence[str], depths: Sequence[float]) -> str:
    """The first `n_words` words of the essay haystack (repeated if needed), with each needle at the sentence
    boundary int(depth * number of sentences), as RULER does."""
    words = essay_words()
    text = (words * (n_words // len(words) + 1))[:n_words] if n_words > len(words) else words[:n_words]
    sents = sentences(text)
    return " ".join(insert_lines(sents, needles, [int(len(sents) * d) for d in depths]))


def niah_parts(task: Task, rng: random.Random) -> dict:
    """A niah sample's random draw: keys, values, needles (shuffled), depths, the query and its answers."""
    draw = Distinct(rng)
    num_keys = max(task.num_keys, task.num_queries)
    keys = [draw(task.key_type) for _ in range(num_keys)]
    values = [[draw(task.value_type) for _ in range(task.num_values)] for _ in keys]
    needles = [NEEDLE.format(v=task.value_type, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    if task.haystack == "essay":  # RULER: distinct depths among 40 levels in [0, 100%]
        levels = [round(100 * i / (DEPTH_LEVELS - 1)) / 100 for i in range(DEPTH_LEVELS)]
        depths = rng.sample(levels, len(needles))
    else:
        depths = [rng.random() for _ in needles]
    asked = rng.sample(range(num_keys), task.num_queries)
    queries = [keys[i] for i in asked]
    query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
    return dict(keys=keys, needles=needles, depths=depths, query=query,
                answers=[v for i in asked for v in values[i]], draw=draw)


def niah_sample(task: Task, tokenizer, target: int, rng: random.Random, chat: bool, depth: float | None) -> tuple:
    parts = niah_parts(task, rng)
    needles, depths = parts["needles"], parts["depths"] if depth is None else [depth] * len(parts["needles"])
    one = task.num_queries * task.num_values == 1
    v = task.value_type[:-1] if one else task.value_type
    template, prefix = (NIAH_TEMPLATE_ONE, NIAH_ANSWER_PREFIX_ONE) if one else (NIAH_TEMPLATE, NIAH_ANSWER_PREFIX)
    answer_prefix = prefix.format(v=v, query=parts["query"])
    if task.haystack == "needle":  # distractors: other keys and values, drawn on demand in a fixed order
        distractors, draw = [], parts["draw"]

        def lines(n):
            while len(distractors) < n:
                distractors.append(NEEDLE.format(v=task.value_type, key=draw(task.key_type),
                                                 value=draw(task.value_type)))
            return distractors[:n]

    def context(n):
        if task.haystack == "essay":
            return essay_context(n, needles, depths)
        haystack = [FILLER] * n if task.haystack == "noise" else lines(n)
        return "\n".join(at_depths(haystack, needles, depths))

    def build(n):
        return wrap(tokenizer, template.format(v=v, context=context(n), query=parts["query"]), answer_prefix, chat)

    unit = {"essay": 1.3, "noise": 25, "needle": 30}[task.haystack]  # rough tokens per word / line
    n, prompt = fit(build, lambda text: count_tokens(tokenizer, text, chat), target - task.tokens_to_generate,
                    max(1, int(target / unit)))
    return prompt, parts["answers"], needles, depths, n, {"query": parts["query"]}


def vt_chain(task: Task, rng: random.Random, letters: int = 5) -> tuple[list[str], list[str], str]:
    """Variable names (distinct, `letters` upper-case letters), the chain's lines and the value they all hold."""
    names = []
    while len(names) < task.num_hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    lines = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(names, names[1:])]
    return names, lines, value


def vt_text(task: Task, n: int, lines: list[str], fractions: list[float], value: str) -> str:
    """The task text (template and answer prefix, no chat template) with the chain over `n` filler lines."""
    context = "\n".join(at_depths([FILLER] * n, lines, fractions))
    return VT_TEMPLATE.format(context=context, query=value) + VT_ANSWER_PREFIX.format(num_v=len(lines), query=value)


def vt_sample(task: Task, tokenizer, target: int, rng: random.Random, chat: bool, depth: float | None) -> tuple:
    if task.num_chains != 1:
        raise ValueError(f"variable tracking supports num_chains=1, got {task.num_chains}")
    # RULER's worked example: a shorter chain of the same kind (3-letter names), fitted to VT_EXAMPLE_TOKENS tokens.
    ex_names, ex_lines, ex_value = vt_chain(task, rng, letters=3)
    ex_fractions = sorted(rng.random() for _ in ex_lines)
    names, lines, value = vt_chain(task, rng)
    fractions = sorted(rng.random() for _ in lines) if depth is None else [depth] * len(lines)
    _, example = fit(lambda n: vt_text(task, n, ex_lines, ex_fractions, ex_value),
                     lambda text: count_tokens(tokenizer, text, False), VT_EXAMPLE_TOKENS, 16)
    example = example.rstrip() + " " + " ".join(ex_names) + "\n"

    def build(n):
        text = vt_text(task, n, lines, fractions, value)
        cut = text.index(VT_ANSWER_PREFIX[:12])
        return wrap(tokenizer, example + text[:cut], text[cut:], chat)

    n, prompt = fit(build, lambda text: count_tokens(tokenizer, text, chat), target - task.tokens_to_generate,
                    max(1, int(target / 25)))
    return prompt, names, lines, fractions, n, {"value": value, "example_names": ex_names}


def task_by_name(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {name!r}")
    return TASKS[name]


def make_sample(task: str | Task, tokenizer, target_tokens: int, index: int = 0, seed: int = 0, chat="auto",
                depth: float | None = None) -> Sample:
    """Sample `index` of `task` at `target_tokens` tokens (prompt + tokens to generate) for `tokenizer`.

    The random draw (keys, values, depths) depends only on (task, target_tokens, seed, index); `depth` (in [0, 1])
    puts every needle / chain line at that depth instead."""
    task = task if isinstance(task, Task) else task_by_name(task)
    if isinstance(target_tokens, bool) or not isinstance(target_tokens, int) or target_tokens < 1:
        raise ValueError(f"target_tokens must be a positive int, got {target_tokens!r}")
    if depth is not None and not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    chat = use_chat(tokenizer, chat)
    rng = random.Random(f"ruler-{task.name}-{target_tokens}-{seed}-{index}")
    make = niah_sample if task.kind == "niah" else vt_sample
    try:
        prompt, references, needles, depths, units, extra = make(task, tokenizer, target_tokens, rng, chat, depth)
    except ValueError as error:
        raise ValueError(f"task {task.name} at {target_tokens} tokens: {error}") from None
    return Sample(task=task.name, index=index, prompt=prompt, references=list(references), needles=list(needles),
                  depths=[round(d, 4) for d in depths], prompt_tokens=count_tokens(tokenizer, prompt, chat),
                  target_tokens=target_tokens, add_special_tokens=not chat, chat=chat, haystack_units=units,
                  extra=extra)


def make_samples(task: str | Task, tokenizer, target_tokens: int, samples: int, seed: int = 0, start: int = 0,
                 chat="auto") -> Iterator[Sample]:
    """Samples start .. start + samples - 1 of (task, target_tokens, seed)."""
    for index in range(start, start + samples):
        yield make_sample(task, tokenizer, target_tokens, index, seed, chat)


# -- evaluation -----------------------------------------------------------------------------------------------
@torch.no_grad()
def run_sample(model, tokenizer, sample: Sample, **generate_kwargs) -> dict:
    """Greedy-generate up to the task's `tokens_to_generate` tokens (stopping at EOS) from the whole prompt in one
    `generate` call; the prediction's `string_match_all` share of the references."""
    device = next(model.parameters()).device
    ids = tokenizer(sample.prompt, add_special_tokens=sample.add_special_tokens, return_tensors="pt").input_ids
    ids = ids.to(device)
    kwargs = dict(max_new_tokens=TASKS[sample.task].tokens_to_generate, do_sample=False, num_beams=1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is not None:
        kwargs["pad_token_id"] = pad
    kwargs.update(generate_kwargs)
    started = time.time()
    output = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    generated = output[0, ids.shape[1]:].tolist()
    prediction = postprocess(tokenizer.decode(generated, skip_special_tokens=True))
    return dict(task=sample.task, index=sample.index, score=match_share(prediction, sample.references),
                prediction=prediction, references=sample.references, depths=sample.depths,
                prompt_tokens=ids.shape[1], generated_tokens=len(generated), seconds=time.time() - started)


def check_tasks(tasks) -> list[str]:
    tasks = list(TASKS) if tasks is None else list(tasks)
    for name in tasks:
        task_by_name(name)
    if not tasks:
        raise ValueError("tasks must name at least one task")
    return tasks


def ruler_scores(model, tokenizer, lengths: Sequence[int], tasks: Sequence[str] | None = None, samples: int = 10,
                 seed: int = 0, start: int = 0, chat="auto", progress: bool = True, on_sample=None,
                 **generate_kwargs) -> list[dict]:
    """Score `model` on each task at each length: a row per (length, task) with its score (string_match_all, in
    percent), samples, mean prompt tokens and seconds, and a row per length with the average over tasks (task
    "average"). A progress bar per length (tqdm, on stderr) unless `progress` is False; `on_sample(result)` is called
    after every sample (e.g. to record it). `generate_kwargs` go to `model.generate` (e.g. `memory_spec`)."""
    from tqdm.auto import tqdm

    tasks = check_tasks(tasks)
    for name, value in (("samples", samples), *(("lengths", n) for n in lengths)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be positive ints, got {value!r}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be an int >= 0, got {start!r}")
    if not lengths:
        raise ValueError("lengths must hold at least one length")
    for name in tasks:  # every (task, length) fits before anything runs
        make_sample(name, tokenizer, min(lengths), start, seed, chat)
    was_training = model.training
    model.eval()
    rows = []
    try:
        for length in lengths:
            per_task = {name: [] for name in tasks}
            bar = tqdm(total=len(tasks) * samples, desc=f"{length} tokens", disable=not progress, leave=True)
            for index in range(start, start + samples):  # sample-major: an interrupted run has every task
                for name in tasks:
                    result = run_sample(model, tokenizer, make_sample(name, tokenizer, length, index, seed, chat),
                                        **generate_kwargs)
                    result.update(target_tokens=length, seed=seed)
                    per_task[name].append(result)
                    if on_sample is not None:
                        on_sample(result)
                    done = [r["score"] for results in per_task.values() for r in results]
                    bar.set_postfix(task=name, mean_score=f"{100 * sum(done) / len(done):.0f}")
                    bar.update(1)
            bar.close()
            length_rows = [dict(task=name, tokens=length, samples=len(results),
                                score=100 * sum(r["score"] for r in results) / len(results),
                                mean_prompt_tokens=sum(r["prompt_tokens"] for r in results) / len(results),
                                seconds=sum(r["seconds"] for r in results)) for name, results in per_task.items()]
            rows += length_rows + [dict(task="average", tokens=length, samples=samples * len(tasks),
                                        score=sum(r["score"] for r in length_rows) / len(length_rows),
                                        mean_prompt_tokens=sum(r["mean_prompt_tokens"] for r in length_rows)
                                        / len(length_rows),
                                        seconds=sum(r["seconds"] for r in length_rows))]
    finally:
        model.train(was_training)
    return rows


def score_table(rows: Sequence[dict]) -> str:
    """Rows of `ruler_scores` as one markdown table per length: task, score, samples, mean prompt tokens, seconds."""
    out = []
    for length in dict.fromkeys(r["tokens"] for r in rows):
        out += [f"\n{length} tokens\n", "| task | score | samples | prompt tokens | seconds |", "|---|---|---|---|---|"]
        out += [f"| {r['task']} | {r['score']:.1f} | {r['samples']} | {r['mean_prompt_tokens']:.0f} | "
                f"{r['seconds']:.1f} |" for r in rows if r["tokens"] == length]
    return "\n".join(out).lstrip("\n")


# -- results files --------------------------------------------------------------------------------------------
def check_output(path) -> str:
    """`path` as a string if rows can be written there: a .csv or .json name in an existing, writable folder."""
    path = os.fspath(path)
    if not path.endswith((".csv", ".json")):
        raise ValueError(f"output {path!r}: expected a file name ending in .csv or .json")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ValueError(f"output {path!r}: the folder {folder!r} does not exist or is not writable")
    if os.path.isdir(path):
        raise ValueError(f"output {path!r} is a folder")
    return path


def save_rows(path, rows: Sequence[dict]) -> None:
    """Write `rows` to a .csv (a header of every key, in order of appearance) or .json file: a temporary file in the
    same folder, fsynced, renamed over `path`, then the folder fsynced."""
    import csv
    import io
    import json
    import tempfile

    path = check_output(path)
    if path.endswith(".json"):
        text = json.dumps(list(rows), indent=2) + "\n"
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for row in rows for k in row)), restval="")
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        publish_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


__all__ = [
    "Sample", "TASKS", "Task", "check_output", "make_sample", "make_samples", "match_share", "ruler_scores",
    "run_sample", "save_rows", "score_table", "string_match_all",
]
