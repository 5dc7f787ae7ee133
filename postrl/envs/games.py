"""Built-in text environments (LMRL-Gym's task families, written here where no offline library exists).

==========================  ===========================================================================
name                        task
==========================  ===========================================================================
``maze``                    reach the goal of a small grid maze; the whole grid is shown every turn
``maze_partial``            the same maze, but only the four neighbouring cells are described (text
                            navigation, partially observed)
``guess_number``            find a secret integer with higher / lower answers
``twenty_questions``        find an object of a fixed table by yes/no questions about its attributes;
                            the oracle is scripted from the table (no language model)
``wordle``                  Wordle with the word list shipped in ``postrl/envs/data/wordle_words.txt``
``arithmetic``              one arithmetic question (e.g. 3-4 digit multiplication), answered in one
                            turn; with ``env.tools: [calculator]`` the model can compute first
``qa``                      the data sample's question, scored against its answer (single turn)
==========================  ===========================================================================

Rewards are 1 for solving the task (the step that ends the episode) and 0 otherwise, unless a
``step_penalty`` is set. Each step's info has ``state_key`` (the true state, for GiGPO's anchor groups),
``invalid`` for an action that could not be read, and the last step's info has ``success``.
"""

from __future__ import annotations

import re
from collections import deque
from importlib import resources
from typing import Any, Optional

from postrl.data.answers import extract_answer

from .base import EnvError, TextEnv, register_env

__all__ = ["ArithmeticEnv", "GuessNumberEnv", "MazeEnv", "PartialMazeEnv", "QAEnv", "TwentyQuestionsEnv",
           "WordleEnv", "load_word_list", "wordle_feedback"]

_NUMBER_RE = re.compile(r"-?\d+")


# --------------------------------------------------------------------------------------------- #
# maze
# --------------------------------------------------------------------------------------------- #

MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
_MOVE_ALIASES = {"u": "up", "d": "down", "l": "left", "r": "right", "north": "up", "south": "down",
                 "west": "left", "east": "right"}
_MOVE_RE = re.compile(r"\b(up|down|left|right|north|south|east|west)\b", re.IGNORECASE)


def parse_move(action: str) -> Optional[str]:
    """The first direction word of ``action`` (up / down / left / right, or north / south / west / east), or
    a one-letter answer ``u`` / ``d`` / ``l`` / ``r``; None when there is none."""
    m = _MOVE_RE.search(action)
    if m:
        word = m.group(1).lower()
        return _MOVE_ALIASES.get(word, word)
    return _MOVE_ALIASES.get(action.strip().lower()[:1]) if len(action.strip()) == 1 else None


@register_env("maze")
class MazeEnv(TextEnv):
    """A ``size`` x ``size`` grid maze: ``#`` wall, ``.`` open, ``A`` the agent, ``G`` the goal. The maze
    (walls with probability ``wall_prob``, start, goal at least ``min_distance`` moves away, always
    reachable) is drawn from the episode's seed. Actions: up / down / left / right (or u / d / l / r).
    Reward 1 on reaching the goal (``step_penalty`` is added to every other step); a wall bump or an
    unreadable action leaves the agent where it is. ``shaping`` > 0 adds potential-based shaping
    (Ng et al. 1999, with the potential -shaping x moves-to-goal and no discount): +shaping for a move that
    brings the agent one move closer to the goal, -shaping for one that takes it further, 0 for a bump; it
    sums to shaping x (start distance - end distance) over an episode, so the best policies do not change.
    ``instructions=False`` leaves the one-line instructions out of the first observation (the grid alone): a
    tiny random model then attends over ~10 prompt tokens instead of ~80, which is what lets it learn to read
    the grid (docs/agents.md, the maze recipe)."""

    observe = "full"

    def __init__(self, size: int = 4, wall_prob: float = 0.2, min_distance: int = 2, step_penalty: float = 0.0,
                 shaping: float = 0.0, instructions: bool = True):
        if size < 2:
            raise EnvError(f"maze: size must be >= 2, got {size}")
        if not 0 <= wall_prob < 0.6:
            raise EnvError(f"maze: wall_prob must be in [0, 0.6), got {wall_prob}")
        self.size, self.wall_prob, self.min_distance, self.step_penalty = size, wall_prob, min_distance, step_penalty
        self.shaping, self.instructions = shaping, bool(instructions)

    def _distances(self, start: tuple[int, int]) -> dict[tuple[int, int], int]:
        dist = {start: 0}
        queue = deque([start])
        while queue:
            r, c = queue.popleft()
            for dr, dc in MOVES.values():
                nxt = (r + dr, c + dc)
                if self._open(nxt) and nxt not in dist:
                    dist[nxt] = dist[(r, c)] + 1
                    queue.append(nxt)
        return dist

    def _open(self, cell: tuple[int, int]) -> bool:
        r, c = cell
        return 0 <= r < self.size and 0 <= c < self.size and cell not in self.walls

    def _reset(self, sample: Any):
        cells = [(r, c) for r in range(self.size) for c in range(self.size)]
        for _ in range(1000):
            self.walls = {cell for cell in cells if self.rng.random() < self.wall_prob}
            free = [cell for cell in cells if cell not in self.walls]
            if len(free) < 2:
                continue
            self.pos = self.rng.choice(free)
            far = [cell for cell, d in self._distances(self.pos).items() if d >= min(self.min_distance,
                                                                                   2 * self.size - 2)]
            if far:
                self.goal = self.rng.choice(sorted(far))
                break
        else:  # pragma: no cover - practically unreachable with wall_prob < 0.6
            raise EnvError("maze: could not draw a solvable maze")
        self.to_goal = self._distances(self.goal)  # moves from each cell to the goal
        self.optimal = self.to_goal[self.pos]
        intro = "Reach the goal G. Answer with one move: up, down, left or right.\n" if self.instructions else ""
        return intro + self.render(), {"state_key": self.pos, "optimal_moves": self.optimal}

    def render(self) -> str:
        rows = []
        for r in range(self.size):
            row = ""
            for c in range(self.size):
                cell = (r, c)
                row += "A" if cell == self.pos else "G" if cell == self.goal else "#" if cell in self.walls else "."
            rows.append(row)
        return "\n".join(rows)

    def _step(self, action: str):
        move = parse_move(action)
        if move is None:
            return ("Invalid move. Answer with up, down, left or right.\n" + self.render(), self.step_penalty,
                    False, {"invalid": True, "state_key": self.pos})
        dr, dc = MOVES[move]
        nxt = (self.pos[0] + dr, self.pos[1] + dc)
        bumped = not self._open(nxt)
        before = self.to_goal[self.pos]
        if not bumped:
            self.pos = nxt
        shaped = self.shaping * (before - self.to_goal[self.pos])
        if self.pos == self.goal:
            return "You reached the goal.", 1.0 + shaped, True, {"success": True, "state_key": self.pos}
        text = ("You hit a wall.\n" if bumped else "") + self.render()
        return text, self.step_penalty + shaped, False, {"state_key": self.pos, "invalid": False}


@register_env("maze_partial")
class PartialMazeEnv(MazeEnv):
    """The maze of :class:`MazeEnv`, partially observed: each observation names only what lies in the four
    directions next to the agent (``wall``, ``open`` or ``goal``), never the grid or the coordinates, so the
    model has to remember where it has been (text navigation)."""

    observe = "partial"

    def render(self) -> str:
        parts = []
        for name, (dr, dc) in MOVES.items():
            cell = (self.pos[0] + dr, self.pos[1] + dc)
            parts.append(f"{name}: {'goal' if cell == self.goal else 'open' if self._open(cell) else 'wall'}")
        return ", ".join(parts)


# --------------------------------------------------------------------------------------------- #
# guess the number
# --------------------------------------------------------------------------------------------- #

@register_env("guess_number")
class GuessNumberEnv(TextEnv):
    """Find the secret integer in ``[low, high]`` (drawn from the seed). Each turn the last integer of the
    action is the guess; the answer is ``Higher.``, ``Lower.`` or ``Correct!`` (reward 1, done). The
    state key is the interval still possible given the answers so far."""

    def __init__(self, low: int = 1, high: int = 20, step_penalty: float = 0.0):
        if high <= low:
            raise EnvError(f"guess_number: high ({high}) must be > low ({low})")
        self.low, self.high, self.step_penalty = low, high, step_penalty

    def _reset(self, sample: Any):
        self.secret = self.rng.randint(self.low, self.high)
        self.lo, self.hi = self.low, self.high
        return (f"I am thinking of an integer between {self.low} and {self.high}. Guess it; I will say higher "
                f"or lower. Answer with a number."), {"state_key": (self.lo, self.hi)}

    def _step(self, action: str):
        nums = _NUMBER_RE.findall(action)
        if not nums:
            return "Answer with a number.", self.step_penalty, False, {"invalid": True, "state_key": (self.lo, self.hi)}
        guess = int(nums[-1])
        if guess == self.secret:
            return "Correct!", 1.0, True, {"success": True, "state_key": ("solved",)}
        if guess < self.secret:
            self.lo = max(self.lo, guess + 1)
            text = "Higher."
        else:
            self.hi = min(self.hi, guess - 1)
            text = "Lower."
        return text, self.step_penalty, False, {"state_key": (self.lo, self.hi), "invalid": False}


# --------------------------------------------------------------------------------------------- #
# twenty questions
# --------------------------------------------------------------------------------------------- #

# attribute -> words that name it in a question
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "alive": ("alive", "living", "live"),
    "animal": ("animal",),
    "plant": ("plant",),
    "man-made": ("man-made", "manmade", "artificial", "made by people"),
    "bigger than a person": ("bigger", "larger", "big", "large"),
    "edible": ("edible", "eat", "food"),
    "electronic": ("electronic", "electric", "electricity"),
    "kept indoors": ("indoors", "inside", "indoor"),
    "can fly": ("fly", "flies", "flying"),
    "made of metal": ("metal",),
    "used for transport": ("transport", "vehicle", "travel", "ride"),
    "has legs": ("legs", "leg"),
    "lives in water": ("water", "swim", "sea", "ocean"),
}
# object -> the attributes that are true for it (all others are false)
OBJECTS: dict[str, frozenset[str]] = {k: frozenset(v) for k, v in {
    "dog": {"alive", "animal", "has legs", "kept indoors"},
    "cat": {"alive", "animal", "has legs", "kept indoors"},
    "eagle": {"alive", "animal", "can fly", "has legs"},
    "shark": {"alive", "animal", "lives in water", "bigger than a person"},
    "elephant": {"alive", "animal", "has legs", "bigger than a person"},
    "goldfish": {"alive", "animal", "lives in water", "kept indoors"},
    "tree": {"alive", "plant", "bigger than a person"},
    "rose": {"alive", "plant"},
    "apple": {"edible", "plant"},
    "banana": {"edible", "plant"},
    "bread": {"edible", "man-made", "kept indoors"},
    "car": {"man-made", "made of metal", "used for transport", "bigger than a person"},
    "bicycle": {"man-made", "made of metal", "used for transport"},
    "airplane": {"man-made", "made of metal", "used for transport", "can fly", "bigger than a person"},
    "boat": {"man-made", "used for transport", "lives in water", "bigger than a person"},
    "phone": {"man-made", "electronic", "kept indoors"},
    "computer": {"man-made", "electronic", "kept indoors", "made of metal"},
    "chair": {"man-made", "has legs", "kept indoors"},
    "spoon": {"man-made", "made of metal", "kept indoors"},
    "book": {"man-made", "kept indoors"},
}.items()}


@register_env("twenty_questions")
class TwentyQuestionsEnv(TextEnv):
    """Twenty questions against a scripted oracle. The secret object is drawn (from the seed) from
    :data:`OBJECTS` (or ``objects``, a subset). A question naming an object (``Is it a dog?``) is a guess:
    right ends the episode with reward 1; wrong costs a question. Any other question is matched to one
    attribute of :data:`ATTRIBUTES` by its words and answered ``Yes.`` / ``No.`` from the table; a question
    the oracle cannot map gets a hint listing what it can answer. After ``max_questions`` the episode ends
    (reward 0)."""

    def __init__(self, max_questions: int = 20, objects: Optional[list[str]] = None):
        names = list(objects) if objects else sorted(OBJECTS)
        unknown = [o for o in names if o not in OBJECTS]
        if unknown:
            raise EnvError(f"twenty_questions: unknown objects {unknown}; valid: {', '.join(sorted(OBJECTS))}")
        self.names, self.max_questions = names, max_questions

    def _reset(self, sample: Any):
        self.secret = self.rng.choice(self.names)
        self.known: list[tuple[str, str]] = []
        self.asked = 0
        return (f"I am thinking of one of these: {', '.join(self.names)}. Ask yes/no questions about it "
                f"(alive, animal, plant, man-made, big, edible, electronic, indoors, fly, metal, transport, "
                f"legs, water) or guess with 'Is it a ...?'. You have {self.max_questions} questions."), \
            {"state_key": ()}

    def _answer(self, question: str) -> tuple[str, Optional[str], bool]:
        q = question.lower()
        for name in sorted(self.names, key=len, reverse=True):
            if re.search(rf"\b{re.escape(name)}s?\b", q):
                return ("Yes! You found it." if name == self.secret else f"No, it is not a {name}."), name, True
        best, best_len = None, 0
        for attr, words in ATTRIBUTES.items():
            for w in words:
                if re.search(rf"\b{re.escape(w)}\b", q) and len(w) > best_len:
                    best, best_len = attr, len(w)
        if best is None:
            return ("I can only answer questions about: " + ", ".join(ATTRIBUTES) + "."), None, False
        return ("Yes." if best in OBJECTS[self.secret] else "No."), best, True

    def _step(self, action: str):
        text, topic, understood = self._answer(action)
        self.asked += 1
        if topic == self.secret:
            return text, 1.0, True, {"success": True, "state_key": ("solved",)}
        if understood:
            self.known.append((topic, text))
        key = tuple(sorted(set(self.known)))
        if self.asked >= self.max_questions:
            return text + " No questions left.", 0.0, True, {"success": False, "state_key": key}
        return text, 0.0, False, {"state_key": key, "invalid": not understood}


# --------------------------------------------------------------------------------------------- #
# wordle
# --------------------------------------------------------------------------------------------- #

_WORDS: Optional[list[str]] = None


def load_word_list() -> list[str]:
    """The five-letter words shipped with postrl (``postrl/envs/data/wordle_words.txt``)."""
    global _WORDS
    if _WORDS is None:
        text = resources.files("postrl.envs").joinpath("data/wordle_words.txt").read_text(encoding="utf-8")
        _WORDS = [w.strip() for w in text.splitlines() if w.strip() and not w.startswith("#")]
    return list(_WORDS)


def wordle_feedback(guess: str, secret: str) -> str:
    """Per letter: ``G`` right letter in the right place, ``Y`` in the word elsewhere, ``-`` not (more) in the
    word. Repeated letters are marked yellow only as often as the secret has them left after the greens
    (``wordle_feedback("speed", "abide") == "--Y-Y"``: one ``e`` of the secret is left for two in the guess)."""
    out = ["-"] * 5
    left: dict[str, int] = {}
    for g, s in zip(guess, secret):
        if g != s:
            left[s] = left.get(s, 0) + 1
    for i, (g, s) in enumerate(zip(guess, secret)):
        if g == s:
            out[i] = "G"
        elif left.get(g, 0) > 0:
            out[i] = "Y"
            left[g] -= 1
    return "".join(out)


_WORD_RE = re.compile(r"\b[a-zA-Z]{5}\b")


@register_env("wordle")
class WordleEnv(TextEnv):
    """Wordle: guess the secret five-letter word (drawn from the seed from the shipped list) in
    ``max_guesses``. The guess is the last five-letter word of the action; the answer shows it with one mark
    per letter (``G`` / ``Y`` / ``-``, see :func:`wordle_feedback`). A word not in the list (when
    ``require_in_list``) is refused without costing a guess. Reward 1 when solved."""

    def __init__(self, max_guesses: int = 6, require_in_list: bool = True, words: Optional[list[str]] = None):
        self.words = [w.lower() for w in (words or load_word_list())]
        bad = [w for w in self.words if len(w) != 5 or not w.isalpha()]
        if bad:
            raise EnvError(f"wordle: words must have five letters, got {bad[:5]}")
        self.vocab = set(self.words)
        self.max_guesses, self.require_in_list = max_guesses, require_in_list

    def _reset(self, sample: Any):
        self.secret = self.rng.choice(self.words)
        self.history: list[tuple[str, str]] = []
        return (f"Guess the secret five-letter English word in {self.max_guesses} tries. After each guess I "
                "show each letter with G (right place), Y (in the word, elsewhere) or - (not in the word). "
                "Answer with one word."), {"state_key": ()}

    def _step(self, action: str):
        words = _WORD_RE.findall(action)
        key = tuple(self.history)
        if not words:
            return "Answer with one five-letter word.", 0.0, False, {"invalid": True, "state_key": key}
        guess = words[-1].lower()
        if self.require_in_list and guess not in self.vocab:
            return f"{guess} is not in the word list. Try another word.", 0.0, False, \
                {"invalid": True, "state_key": key}
        fb = wordle_feedback(guess, self.secret)
        self.history.append((guess, fb))
        key = tuple(self.history)
        if guess == self.secret:
            return f"{guess} {fb} Solved!", 1.0, True, {"success": True, "state_key": key}
        if len(self.history) >= self.max_guesses:
            return f"{guess} {fb} No guesses left; the word was {self.secret}.", 0.0, True, \
                {"success": False, "state_key": key}
        return f"{guess} {fb} ({self.max_guesses - len(self.history)} guesses left)", 0.0, False, \
            {"state_key": key, "invalid": False}


# --------------------------------------------------------------------------------------------- #
# single-turn question answering (arithmetic, data samples)
# --------------------------------------------------------------------------------------------- #

def _numbers_equal(text: Optional[str], answer: str) -> bool:
    if text is None:
        return False
    try:
        return abs(float(text.replace(",", "")) - float(answer)) < 1e-9
    except ValueError:
        return text.strip() == answer.strip()


@register_env("arithmetic")
class ArithmeticEnv(TextEnv):
    """One arithmetic question drawn from the seed, e.g. ``What is 482 * 7315?`` (``op`` in ``* + -``,
    operands of ``digits`` = (min, max) digits). The first action without a tool call is the answer: its
    last number (``answer_extraction``: last_number) is compared with the result; reward 1 if equal."""

    def __init__(self, op: str = "*", digits: tuple[int, int] = (3, 4), answer_extraction: str = "last_number"):
        if op not in ("*", "+", "-"):
            raise EnvError(f"arithmetic: op must be one of * + -, got {op!r}")
        lo, hi = digits
        if not 1 <= lo <= hi <= 12:
            raise EnvError(f"arithmetic: digits must be (min, max) with 1 <= min <= max <= 12, got {digits}")
        self.op, self.digits, self.mode = op, (lo, hi), answer_extraction

    def _number(self) -> int:
        n = self.rng.randint(*self.digits)
        return self.rng.randint(10 ** (n - 1), 10 ** n - 1)

    def _reset(self, sample: Any):
        a, b = self._number(), self._number()
        self.answer = str(a * b if self.op == "*" else a + b if self.op == "+" else a - b)
        return f"What is {a} {self.op} {b}? Give the final answer as a number.", {"state_key": "question"}

    def _step(self, action: str):
        ok = _numbers_equal(extract_answer(action, self.mode), self.answer)
        return [], float(ok), True, {"success": ok, "answer": self.answer}


@register_env("qa")
class QAEnv(TextEnv):
    """The episode's data sample as one question (``sample.question``), answered in one turn (or after tool
    calls): reward 1 when the answer extracted with ``answer_extraction`` equals ``sample.answer`` (as numbers
    when both parse, else as stripped strings). Needs a sample: use it with a data source."""

    def __init__(self, answer_extraction: str = "last_number", prompt_template: str = "{question}"):
        self.mode, self.template = answer_extraction, prompt_template

    def _reset(self, sample: Any):
        if sample is None or not hasattr(sample, "question"):
            raise EnvError("qa: reset needs a data sample with .question and .answer")
        self.answer = str(sample.answer)
        return self.template.format(question=sample.question), {"state_key": "question"}

    def _step(self, action: str):
        ok = _numbers_equal(extract_answer(action, self.mode), self.answer)
        return [], float(ok), True, {"success": ok}
