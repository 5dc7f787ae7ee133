"""Environments, tools and adapters (postrl/envs)."""

from __future__ import annotations

import json
import random
from collections import deque

import pytest

from postrl.config import ConfigError
from postrl.config.checks import Problems
from postrl.config.env import EnvConfig
from postrl.envs import ENVS, Tool, ToolEnv, build_env, build_tools, calculate, env_factory, parse_tool_calls
from postrl.envs.games import MOVES, OBJECTS, load_word_list, wordle_feedback


# --------------------------------------------------------------------------------------------- #
# registry and config
# --------------------------------------------------------------------------------------------- #

def test_unknown_environment_and_arguments_name_the_valid_ones():
    with pytest.raises(ConfigError, match=r"Unknown environment 'mazee'.*Did you mean 'maze'.*Valid: .*wordle"):
        build_env("mazee")
    with pytest.raises(ConfigError, match=r"unknown arguments 'sise'; valid: size, wall_prob"):
        build_env("maze", {"sise": 3})
    with pytest.raises(ConfigError, match="cannot import"):
        build_env("no_such_module_xyz:Env")
    env = build_env("postrl.envs.games:GuessNumberEnv", {"high": 5})
    assert env.reset(seed=0)[0][0]["content"].startswith("I am thinking of an integer between 1 and 5")
    assert {"maze", "maze_partial", "guess_number", "twenty_questions", "wordle", "chess_endgame", "textarena",
            "skyrl_gym", "reasoning_gym", "arithmetic", "qa"} <= set(ENVS)


def test_unknown_tool_names_the_valid_ones():
    with pytest.raises(ConfigError, match=r"Unknown tool 'calc'.*Valid: calculator, python, search, sql"):
        build_tools(["calc"])


def test_env_config_validation():
    p = Problems()
    EnvConfig(name="maze", max_turns=0, max_episode_tokens=10, tools=[3]).validate(
        p, type("C", (), {"rollout": type("R", (), {"max_new_tokens": 64})()})())
    text = "\n".join(p.messages)
    assert "env.max_turns=0" in text and "env.tools.0" in text and "env.max_episode_tokens=10 is smaller" in text
    p = Problems()
    EnvConfig(tools=["calculator"]).validate(p, None)
    assert any("env.tools needs an environment" in m for m in p.messages)
    p = Problems()
    EnvConfig(name="maze", max_tokens_per_turn=8).validate(p, None)
    assert p.messages == []


def test_env_factory_builds_a_fresh_instance_per_episode_and_wraps_tools():
    make = env_factory(EnvConfig(name="arithmetic", kwargs={"digits": [2, 2]}, tools=["calculator"]))
    a, b = make(), make()
    assert a is not b and isinstance(a, ToolEnv) and [t.name for t in a.tools] == ["calculator"]
    with pytest.raises(ConfigError):
        env_factory(EnvConfig(name="maze", kwargs={"bad": 1}))


# --------------------------------------------------------------------------------------------- #
# games
# --------------------------------------------------------------------------------------------- #

def _shortest_moves(env) -> list[str]:
    start, goal = env.pos, env.goal
    prev = {start: None}
    queue = deque([start])
    while queue:
        cell = queue.popleft()
        for name, (dr, dc) in MOVES.items():
            nxt = (cell[0] + dr, cell[1] + dc)
            if env._open(nxt) and nxt not in prev:
                prev[nxt] = (cell, name)
                queue.append(nxt)
    moves, cell = [], goal
    while prev[cell] is not None:
        cell, name = prev[cell]
        moves.append(name)
    return moves[::-1]


@pytest.mark.parametrize("name", ["maze", "maze_partial"])
def test_maze_is_seeded_solvable_and_pays_at_the_goal(name):
    for seed in range(20):
        env = build_env(name, {"size": 4, "wall_prob": 0.3})
        obs, info = env.reset(seed=seed)
        again = build_env(name, {"size": 4, "wall_prob": 0.3}).reset(seed=seed)[0]
        assert obs == again
        moves = _shortest_moves(env)
        assert len(moves) == info["optimal_moves"] >= 1
        for k, m in enumerate(moves):
            obs, r, done, info = env.step(f"I go {m}." if k % 2 else m[0])
            assert done == (k == len(moves) - 1) and r == float(done)
        assert info["success"] is True
    text = build_env("maze_partial").reset(seed=1)[0][0]["content"]
    assert "up: " in text and "#" not in text and "A" not in text.split("\n")[-1]


def test_maze_wall_bump_and_invalid_action_keep_the_agent():
    env = build_env("maze", {"size": 3, "wall_prob": 0.0})
    env.reset(seed=0)
    env.pos, env.goal = (0, 0), (2, 2)
    obs, r, done, info = env.step("up")
    assert obs[0]["content"].startswith("You hit a wall.") and env.pos == (0, 0) and not done
    obs, r, done, info = env.step("jump!")
    assert info["invalid"] and env.pos == (0, 0) and obs[0]["content"].startswith("Invalid move")
    env.step("right")
    assert env.pos == (0, 1) and env.render().splitlines()[0] == ".A."


def test_maze_shaping_pays_progress_and_charges_detours():
    env = build_env("maze", {"size": 3, "wall_prob": 0.0, "shaping": 0.1})
    env.reset(seed=0)
    env.pos, env.goal = (0, 0), (2, 2)
    env.to_goal = env._distances(env.goal)
    rewards = [env.step(m)[1] for m in ("right", "left", "up", "right", "right", "down")]
    assert rewards == pytest.approx([0.1, -0.1, 0.0, 0.1, 0.1, 0.1])
    assert env.step("down")[1:3] == (pytest.approx(1.1), True)
    assert sum(rewards) == pytest.approx(0.1 * (4 - 1))  # potential difference, whatever the path


def test_guess_number_binary_search_and_state_keys():
    env = build_env("guess_number", {"low": 1, "high": 100})
    obs, info = env.reset(seed=3)
    lo, hi, turns = 1, 100, 0
    while True:
        g = (lo + hi) // 2
        obs, r, done, info = env.step(f"My guess is {g}")
        turns += 1
        if done:
            break
        assert info["state_key"] == ((g + 1, hi) if obs[0]["content"] == "Higher." else (lo, g - 1))
        lo, hi = info["state_key"]
    assert r == 1.0 and info["success"] and turns <= 7 and g == env.secret
    assert env.step("no number")[3]["invalid"]


def test_twenty_questions_oracle_answers_from_the_table():
    env = build_env("twenty_questions", {"max_questions": 5})
    env.reset(seed=4)
    secret = env.secret
    assert env.step("Is it an animal?")[0][0]["content"] == ("Yes." if "animal" in OBJECTS[secret] else "No.")
    assert env.step("Can it fly?")[0][0]["content"] == ("Yes." if "can fly" in OBJECTS[secret] else "No.")
    obs, r, done, info = env.step("What colour is it?")
    assert info["invalid"] and "I can only answer" in obs[0]["content"]
    wrong = next(o for o in OBJECTS if o != secret)
    obs, r, done, _ = env.step(f"Is it a {wrong}?")
    assert obs[0]["content"] == f"No, it is not a {wrong}." and r == 0 and not done
    obs, r, done, info = env.step(f"Is it a {secret}?")
    assert r == 1.0 and done and info["success"]
    env.reset(seed=4)
    for _ in range(4):
        env.step("Is it metal?")
    assert env.step("Is it alive?")[2]  # fifth question: no questions left


def test_wordle_feedback_by_hand_and_a_solved_game():
    assert wordle_feedback("speed", "abide") == "--Y-Y"
    assert wordle_feedback("llama", "hello") == "YY---"
    assert wordle_feedback("hello", "llama") == "--YY-"
    assert wordle_feedback("crane", "crane") == "GGGGG"
    assert wordle_feedback("eerie", "there") == "Y-Y-G"  # the green e uses one e, the other e of "there" one more
    words = load_word_list()
    assert len(words) >= 400 and all(len(w) == 5 and w.isalpha() for w in words) and len(set(words)) == len(words)
    env = build_env("wordle")
    env.reset(seed=9)
    obs, r, done, info = env.step("zzzzq")
    assert info["invalid"] and "not in the word list" in obs[0]["content"] and not done
    other = next(w for w in words if w != env.secret)
    obs, r, done, info = env.step(f"I try {other}")
    assert obs[0]["content"].startswith(f"{other} {wordle_feedback(other, env.secret)}") and r == 0
    obs, r, done, info = env.step(env.secret.upper())
    assert r == 1.0 and done and info["success"]


def test_arithmetic_and_qa_single_turn():
    env = build_env("arithmetic", {"digits": [3, 4]})
    obs, _ = env.reset(seed=1)
    a, b = [int(x) for x in obs[0]["content"].split("?")[0].split() if x.isdigit()]
    assert 100 <= a <= 9999 and env.step(f"The answer is {a * b:,}.")[1] == 1.0
    env.reset(seed=1)
    assert env.step(str(a * b + 1))[1:3] == (0.0, True)

    from postrl.data.base import Sample

    qa = build_env("qa")
    qa.reset(sample=Sample(question="2+2?", answer="4"))
    assert qa.step("it is 4")[1] == 1.0


# --------------------------------------------------------------------------------------------- #
# tools
# --------------------------------------------------------------------------------------------- #

def test_calculator_computes_and_refuses_code():
    assert calculate("1234 * 5678") == 7006652
    assert calculate("(2 + 3) ** 2 / 5 - 7 // 2 % 2") == 4
    assert calculate("3^2") == 9 and calculate("1,000 * 3") == 3000
    for bad in ("__import__('os').system('id')", "x + 1", "2 ** 100000", "9 ** 9 ** 9", "1 / 0", "'a' * 3",
                "(1).__class__"):
        with pytest.raises(ValueError):
            calculate(bad)


def test_parse_tool_calls():
    calls = parse_tool_calls('ok <tool_call>\n{"name": "calculator", "arguments": {"expression": "1+2"}}\n'
                             '</tool_call> and <tool_call>{"name": "f", "parameters": "{\\"x\\": 1}"}</tool_call>'
                             ' <tool_call>{"name": "g", "arguments": {')
    assert [(c.name, c.arguments) for c in calls[:2]] == [("calculator", {"expression": "1+2"}), ("f", {"x": 1})]
    assert calls[2].error.startswith("invalid JSON") and parse_tool_calls("no call") == []
    assert parse_tool_calls('<tool_call>[1, 2]</tool_call>')[0].error.startswith("a tool call must be")


def test_tool_from_function_schema_and_argument_checks():
    def lookup(city: str, days: int = 1) -> str:
        """Weather forecast for a city.

        Longer text that is not part of the description."""
        return f"{city}:{days}"

    t = Tool.from_function(lookup)
    assert t.schema == {"type": "function", "function": {
        "name": "lookup", "description": "Weather forecast for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]}}}
    assert t.call({"city": "Oslo"}) == "Oslo:1"
    assert "missing required" in t.check_arguments({})
    assert "unknown argument" in t.check_arguments({"city": "a", "x": 1})
    assert "must be of type integer" in t.check_arguments({"city": "a", "days": "2"})


def test_tool_env_answers_calls_and_turns_bad_calls_into_error_observations():
    env = ToolEnv(build_env("arithmetic", {"digits": [3, 3]}), build_tools(["calculator"]))
    obs, _ = env.reset(seed=2)
    a, b = [int(x) for x in obs[0]["content"].split("?")[0].split() if x.isdigit()]
    call = json.dumps({"name": "calculator", "arguments": {"expression": f"{a} * {b}"}})
    obs, r, done, info = env.step(f"Let me compute. <tool_call>{call}</tool_call>")
    assert obs == [{"role": "tool", "content": str(a * b), "name": "calculator"}] and not done
    assert info["tool_calls"] == 1 and info["tool_errors"] == 0
    bad = [("<tool_call>{oops</tool_call>", "Error: invalid JSON"),
           ('<tool_call>{"name": "wolfram", "arguments": {}}</tool_call>', "Error: unknown tool 'wolfram'; available: calculator"),
           ('<tool_call>{"name": "calculator", "arguments": {"expr": "1"}}</tool_call>', "Error: ValueError: missing required"),
           ('<tool_call>{"name": "calculator", "arguments": {"expression": "open(1)"}}</tool_call>', "Error: ValueError: unsupported")]
    for text, expected in bad:
        obs, r, done, info = env.step(text)
        assert obs[0]["role"] == "tool" and obs[0]["content"].startswith(expected), obs
        assert info["tool_errors"] == 1 and not done
    obs, r, done, info = env.step(f"The answer is {a * b}")
    assert r == 1.0 and done and info["tool_calls"] == 0


def test_sql_tool_reads_and_refuses_writes():
    (sql,) = build_tools([{"name": "sql", "db_schema": "CREATE TABLE t(a INT, b TEXT); INSERT INTO t VALUES (1, 'x'), (2, 'y');"}])
    assert sql.call({"query": "SELECT a, b FROM t ORDER BY a"}) == "1 | x\n2 | y"
    env = ToolEnv(build_env("guess_number"), [sql])
    env.reset(seed=0)
    obs, _, _, info = env.step('<tool_call>{"name": "sql", "arguments": {"query": "DROP TABLE t"}}</tool_call>')
    assert obs[0]["content"].startswith("Error: SQLRefused") and info["tool_errors"] == 1
    assert sql.call({"query": "SELECT count(*) FROM t"}) == "2"
    with pytest.raises(ConfigError, match="exactly one of db_path"):
        build_tools(["sql"])


def test_search_tool_ranks_the_matching_passage_first(tmp_path):
    pytest.importorskip("bm25s", reason="the search tool needs bm25s (pip install 'postrl[agents]')")
    corpus = tmp_path / "corpus.jsonl"
    docs = [{"title": "Paris", "text": "Paris is the capital of France, on the Seine."},
            {"title": "Oslo", "text": "Oslo is the capital of Norway, at the head of a fjord."},
            {"title": "Cheese", "text": "Cheese is made from milk by curdling."}]
    corpus.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (search,) = build_tools([{"name": "search", "corpus": str(corpus), "k": 2}])
    out = search.call({"query": "What is the capital of Norway?"}).splitlines()
    assert out[0] == "[1] Oslo: " + docs[1]["text"] and len(out) == 2
    assert search.call({"query": "milk", "k": 1}) == "[1] Cheese: " + docs[2]["text"]
    assert search.call({"query": "the of"}) == "(no results)"
    with pytest.raises(ConfigError, match="not found"):
        build_tools([{"name": "search", "corpus": str(tmp_path / "missing.jsonl")}])


def test_python_tool_runs_in_the_sandbox():
    from postrl.rewards.sandbox import probe_isolation

    ok, reason = probe_isolation()
    if not ok:
        pytest.skip(f"the sandbox cannot isolate code on this host: {reason}")
    (py,) = build_tools(["python"])
    assert py.call({"code": "print(sum(range(10)))"}) == "45"
    out = py.call({"code": "open('/etc/shadow').read()"})
    assert "Error" in out and "[status: error]" in out


# --------------------------------------------------------------------------------------------- #
# chess and the adapters
# --------------------------------------------------------------------------------------------- #

def test_chess_endgame_against_stockfish():
    chess = pytest.importorskip("chess", reason="chess_endgame needs python-chess (pip install 'postrl[agents]')")
    from postrl.envs.chess_endgame import find_stockfish

    if find_stockfish() is None:
        pytest.skip("chess_endgame needs the Stockfish binary (apt-get install stockfish); not found")
    env = build_env("chess_endgame", {"material": "KQK", "depth": 3})
    obs, info = env.reset(seed=5)
    assert "FEN: " in obs[0]["content"] and env.board.turn == chess.WHITE and not env.board.is_check()
    assert build_env("chess_endgame").reset(seed=5)[1]["fen"] == info["fen"]
    obs, r, done, info = env.step("I play e9e1")
    assert info["invalid"] and "Legal moves:" in obs[0]["content"] and not done
    move = next(iter(env.board.legal_moves))
    obs, r, done, info = env.step(f"My move: {move.uci()}")
    assert obs[0]["content"].startswith("Black played ") or done
    env.board = chess.Board("k7/8/1K6/8/8/8/8/7Q w - - 0 1")  # Qh8 is mate
    obs, r, done, info = env.step("Qh8#")
    assert (r, done, info["success"]) == (1.0, True, True)
    env.board = chess.Board("k7/8/1K6/8/8/8/8/7R w - - 0 1")
    for _ in range(3):
        obs, r, done, info = env.step("nonsense")
    assert done and r == 0.0 and not info["success"]


def test_textarena_adapter_plays_offline_and_isolates_random():
    pytest.importorskip("textarena", reason="the textarena adapter needs textarena (pip install 'postrl[agents]')")
    random.seed(123)
    before = random.random()
    random.seed(123)
    env = build_env("textarena", {"env_id": "GuessTheNumber-v0"})
    obs, _ = env.reset(seed=7)
    assert "Guess The Number" in obs[0]["content"]
    lo, hi = 1, 20
    for _ in range(10):
        g = (lo + hi) // 2
        obs, r, done, info = env.step(f"[{g}]")
        if done:
            break
        if "higher" in obs[0]["content"]:
            lo = g + 1
        else:
            hi = g - 1
    assert done and r == 1.0
    assert random.random() == before  # the game's random.seed() did not touch the caller's stream
    other = build_env("textarena", {"env_id": "TowerOfHanoi-v0-raw"})
    assert "Tower of Hanoi" in other.reset(seed=1)[0][0]["content"]
    with pytest.raises(Exception, match="unknown env_id"):
        build_env("textarena", {"env_id": "NoSuchGame-v0"})


def test_skyrl_gym_adapter_scores_with_the_library():
    pytest.importorskip("skyrl_gym", reason="the skyrl_gym adapter needs skyrl-gym (pip install 'postrl[agents]')")
    from postrl.data.base import Sample

    env = build_env("skyrl_gym", {"env_id": "gsm8k"})
    obs, _ = env.reset(sample=Sample(question="What is 6 * 7?", answer="42"))
    assert obs == [{"role": "user", "content": "What is 6 * 7?"}]
    assert env.step("6 * 7 = 42\n#### 42")[1:3] == (1.0, True)
    env.reset(sample=Sample(question="What is 6 * 7?", answer="42"))
    assert env.step("#### 41")[1] == 0.0


def test_reasoning_gym_single_turn_environment():
    import reasoning_gym

    env = build_env("reasoning_gym", {"task": "basic_arithmetic"})
    obs, _ = env.reset(seed=11)
    entry = reasoning_gym.create_dataset("basic_arithmetic", seed=11, size=1)[0]
    assert obs[0]["content"] == entry["question"]
    assert env.step(f"<answer>{entry['answer']}</answer>")[1:3] == (1.0, True)
    env.reset(seed=11)
    assert env.step("no tag")[1] == 0.0
