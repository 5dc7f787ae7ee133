"""``postrl eval --env``: models evaluated on multi-turn episodes (success, return, turns, tool calls, pass@k over
episodes with bootstrap CIs), the episode records of samples.jsonl, and bad input."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from postrl.cli import main
from postrl.eval.env_eval import heldout_env_seeds, parse_env_kwargs, parse_tools, per_start_values
from postrl.eval.metrics import pass_at_k_exact
from postrl.eval.runner import EvalError
from postrl.rollout.episodes import EpisodeInfo
from postrl.trainer.rl import train

MAZE = ["--env", "maze", "--env-kwargs", "size=3", "--env-kwargs", "{shaping: 0.1}", "--max-turns", "3",
        "--max-new-tokens", "3", "--max-episode-tokens", "160"]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, out + err
    return code, out, err


def ep(success: bool, ret: float, turns: int, tool_calls: int = 0, truncated: bool = False) -> EpisodeInfo:
    return EpisodeInfo(turns=turns, success=success, episode_return=ret, tool_calls=tool_calls, truncated=truncated,
                       end="done" if not truncated else "max_turns", sampled_tokens=2 * turns, env_tokens=10 * turns)


def test_per_start_values_by_hand():
    # start 0: 1 success of 4 episodes; start 1: 3 of 4
    sampled = [[ep(True, 1.0, 2, 1), ep(False, 0.0, 4, 0, True), ep(False, 0.5, 3), ep(False, 0.0, 3, 2)],
               [ep(True, 1.0, 1), ep(True, 1.0, 2, 1), ep(True, 1.5, 2), ep(False, 0.0, 4, 0, True)]]
    greedy = [ep(False, 0.0, 4), ep(True, 1.0, 1)]
    v = per_start_values(sampled, [1, 2, 4], greedy)
    # pass@1 = c/n; pass@2 = 1 - C(n-c,2)/C(n,2): 1 - 3/6 = 1/2 and 1 - 0 = 1; pass@4 = 1 whenever c >= 1
    assert v["pass@1"] == pytest.approx([0.25, 0.75])
    assert v["pass@2"] == pytest.approx([0.5, 1.0]) and float(pass_at_k_exact(4, 1, 2)) == 0.5
    assert v["pass@4"] == [1.0, 1.0]
    assert v["success_rate"] == [0.25, 0.75]
    assert v["return_mean"] == pytest.approx([1.5 / 4, 3.5 / 4])
    assert v["turns_mean"] == [3.0, 2.25]
    assert v["tool_calls_mean"] == [0.75, 0.25] and v["tool_call_frac"] == [0.5, 0.25]
    assert v["truncated_frac"] == [0.25, 0.25]
    assert v["episode_tokens_mean"] == [36.0, 27.0]  # 12 tokens per turn
    assert v["greedy_success_rate"] == [0.0, 1.0] and v["greedy_turns_mean"] == [4.0, 1.0]
    with pytest.raises(EvalError, match="k = 8 > n = 4"):
        per_start_values(sampled, [8])


def test_kwargs_and_tools_parsing():
    assert parse_env_kwargs(["size=3,wall_prob=0.1", "{shaping: 0.2, digits: [3, 4]}", "op=*"]) == \
        {"size": 3, "wall_prob": 0.1, "shaping": 0.2, "digits": [3, 4], "op": "*"}
    assert parse_env_kwargs(["digits=[3,4],env_id=GuessTheNumber-v0"]) == {"digits": [3, 4],
                                                                           "env_id": "GuessTheNumber-v0"}
    with pytest.raises(EvalError, match="not key=value"):
        parse_env_kwargs(["size"])
    with pytest.raises(EvalError, match="not a YAML mapping"):
        parse_env_kwargs(["{[1, 2]}"])
    assert parse_tools("calculator,python") == ["calculator", "python"]
    assert parse_tools("[calculator, {name: search, corpus: c.jsonl}]") == [
        "calculator", {"name": "search", "corpus": "c.jsonl"}]
    with pytest.raises(EvalError, match="tool name or a mapping"):
        parse_tools("[3]")
    # the seeds of the run's held-out episode evaluation
    assert heldout_env_seeds(0, 3) == [0, 104_729, 209_458]
    assert heldout_env_seeds(2, 1) == [2_000_006]


def test_postrl_eval_on_an_environment(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    code, stdout, _ = cli(capsys, "eval", "--model", str(tiny_model_dir), *MAZE, "--tools", "calculator",
                          "--starts", "5", "--n", "4", "--k", "1,2,4", "--bootstrap", "200", "--out", str(out),
                          "--threads", "1")
    assert code == 0
    assert "environment maze" in stdout and "success rate %" in stdout and "pass@4 %" in stdout
    assert "tool calls per episode" in stdout
    data = json.loads((out / "eval.json").read_text())
    assert data["kind"] == "env" and data["num_starts"] == 5 and data["start_seeds"] == heldout_env_seeds(0, 5)
    assert data["env"]["kwargs"] == {"size": 3, "shaping": 0.1} and data["env"]["tools"] == ["calculator"]
    assert data["env"]["max_turns"] == 3 and data["max_tokens_per_turn"] == 3
    (m,) = data["models"]
    assert set(m["pass_at_k"]) == {"1", "2", "4"} and "maj_at_k" not in m
    for key in ("success_rate", "return_mean", "turns_mean", "tool_calls_mean", "tool_call_frac",
                "greedy_success_rate", "greedy_turns_mean", "invalid_actions_mean", "truncated_frac"):
        stat = m[key]
        lo, hi = stat["ci"]
        assert stat["n"] == 5 and lo <= stat["value"] <= hi, key
    assert 1 <= m["turns_mean"]["value"] <= 3
    p1, p4 = m["pass_at_k"]["1"]["value"], m["pass_at_k"]["4"]["value"]
    assert p1 == pytest.approx(m["success_rate"]["value"]) and p4 >= p1  # pass@1 = success rate
    assert sum(m["end_reasons"].values()) == pytest.approx(1.0)
    assert (out / "pass_at_k.png").read_bytes().startswith(b"\x89PNG")
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 5 * (1 + 4)  # one greedy and n sampled episodes per start
    greedy = [r for r in rows if r["kind"] == "greedy"]
    assert [r["start"] for r in greedy] == list(range(5)) and all("spans" in r for r in greedy)
    assert not any("spans" in r for r in rows if r["kind"] == "sampled")
    for r in rows:
        policy = [t for t in r["transcript"] if t["role"] == "policy"]
        assert len(policy) == r["turns"] == len(r["turn_rewards"])
        assert [t["reward"] for t in policy] == r["turn_rewards"]
        assert r["transcript"][0]["role"] == "system"  # the tools' description (the tiny template renders no tools)
        assert r["transcript"][1]["role"] == "environment" and "Reach the goal" in r["transcript"][1]["text"]
        assert r["return"] == pytest.approx(sum(r["turn_rewards"]))
    for r in greedy:
        kinds = [s["kind"] for s in r["spans"]]
        assert kinds[0] == "prompt" and kinds.count("sampled") == r["turns"]
        assert sum(s["tokens"] for s in r["spans"] if s["kind"] == "sampled") == r["sampled_tokens"]
        assert sum(s["tokens"] for s in r["spans"] if s["kind"] == "env") == r["env_tokens"]
    # the same evaluation again (same seeds): the same numbers
    code, _, _ = cli(capsys, "eval", "--model", str(tiny_model_dir), *MAZE, "--tools", "calculator", "--starts", "5",
                     "--n", "4", "--k", "1,2,4", "--bootstrap", "200", "--out", str(tmp_path / "ev2"), "--threads", "1")
    again = json.loads((tmp_path / "ev2" / "eval.json").read_text())["models"][0]
    assert again["success_rate"] == m["success_rate"] and again["turns_mean"] == m["turns_mean"]


def test_eval_of_a_run_directory_uses_its_environment(tiny_config, tmp_path, capsys):
    """Without --env, a run trained with an environment is evaluated on its own held-out starts: the greedy
    success and turns equal the run's own evaluation after training (same weights, seeds, runner)."""
    run_dir, res = train(tiny_config("env={name: maze, size: 3, max_turns: 3}", "env.max_episode_tokens=160",
                                     "rollout.max_new_tokens=3", "run.threads=1", "data.eval_size=6",
                                     "train.steps=2", "eval.after=true"))
    code, stdout, _ = cli(capsys, "eval", "--model", str(run_dir), "--n", "2", "--bootstrap", "100", "--threads", "1")
    assert code == 0 and "held-out episodes of the run" in stdout
    data = json.loads((run_dir / "eval" / "eval.json").read_text())
    (m,) = data["models"]
    assert data["num_starts"] == 6 and data["env"]["max_turns"] == 3 and data["max_tokens_per_turn"] == 3
    after = res["eval_after"]
    assert m["greedy_success_rate"]["value"] == pytest.approx(after["accuracy"])
    assert m["greedy_turns_mean"]["value"] == pytest.approx(after["turns_mean"])
    assert m["greedy_return_mean"]["value"] == pytest.approx(after["return_mean"])
    # environment flags that would silently change the run's environment are refused
    code, _, err = cli(capsys, "eval", "--model", str(run_dir), "--max-turns", "5", "--out", str(tmp_path / "x"))
    assert code == 2 and "--max-turns" in err and "give --env NAME" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv, message", [
    (["--env", "mazee"], "Unknown environment 'mazee'.*Did you mean 'maze'.*wordle"),
    (["--env", "maze", "--tools", "calculater"], "calculater.*calculator"),
    (["--env", "maze", "--env-kwargs", "sise=3"], "unknown arguments 'sise'; valid: size, wall_prob"),
    (["--env", "maze", "--env-kwargs", "size=1"], "size must be >= 2"),
    (["--env", "maze", "--env-kwargs", "size"], "not key=value"),
    (["--env", "maze", "--max-turns", "0"], "--max-turns 0: must be >= 1"),
    (["--env", "maze", "--starts", "0"], "--starts 0: must be >= 1"),
    (["--env", "maze", "--max-episode-tokens", "2", "--max-new-tokens", "8"], "--max-episode-tokens=2 is smaller"),
    (["--env", "maze", "--answer-extraction", "boxed"], "--answer-extraction: not used with --env"),
    (["--env", "maze", "--tools", "[3]"], "tool name or a mapping"),
    (["--env-kwargs", "size=3", "--task", "basic_arithmetic:size=2"], "--env-kwargs: only with --env"),
    (["--tools", "calculator", "--task", "basic_arithmetic:size=2"], "--tools: only with --env"),
    (["--env", "maze", "--n", "2", "--k", "4"], "k=4: every k must be in"),
])
def test_bad_env_input_exits_2_naming_the_valid_choices(tiny_model_dir, tmp_path, capsys, argv, message):
    import re

    out = tmp_path / "ev"
    code, _, err = cli(capsys, "eval", "--model", str(tiny_model_dir), "--out", str(out), *argv)
    assert code == 2, err
    assert err.startswith("postrl: error:") and re.search(message, err, re.DOTALL), err
    assert not out.exists()


def test_env_eval_with_task_samples(tiny_model_dir, tmp_path, capsys):
    """--env qa --task FILE: the task's samples start the episodes (the environment asks and scores them)."""
    task = tmp_path / "qa.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"what is {i} + 1", "answer": str(i + 1)}) + "\n" for i in range(3)))
    out = tmp_path / "ev"
    code, _, err = cli(capsys, "eval", "--model", str(tiny_model_dir), "--env", "qa", "--task", str(task),
                       "--n", "2", "--max-new-tokens", "3", "--bootstrap", "50", "--out", str(out), "--threads", "1")
    assert code == 0, err
    data = json.loads((out / "eval.json").read_text())
    assert data["num_starts"] == 3
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    firsts = sorted({r["transcript"][0]["text"] for r in rows})
    assert firsts == ["what is 0 + 1", "what is 1 + 1", "what is 2 + 1"]
    assert all(r["turns"] == 1 and r["end"] == "done" for r in rows)  # qa: one answer per episode


def test_episode_record_of_a_fake_episode():
    from postrl.eval.report import episode_record

    info = EpisodeInfo(turns=2, end="done", success=True, episode_return=1.5, turn_rewards=[0.5, 1.0], tool_calls=1,
                       messages=[{"role": "system", "content": "sys"}, {"role": "user", "content": "obs0"},
                                 {"role": "assistant", "content": "<tool_call>{}</tool_call>"},
                                 {"role": "tool", "content": "42", "name": "calculator"},
                                 {"role": "assistant", "content": "42"}, {"role": "user", "content": "solved"}],
                       segments=[("sampled", 0, 2), ("env", 2, 5), ("sampled", 5, 6)], sampled_tokens=3, env_tokens=3)
    tok = SimpleNamespace(decode=lambda ids, skip_special_tokens=False: "".join(chr(97 + i) for i in ids))
    rec = episode_record(info, "PROMPT", [0, 1, 2, 3, 4, 5], tok)
    assert [t["role"] for t in rec["transcript"]] == ["system", "environment", "policy", "tool", "policy",
                                                       "environment"]
    p0, p1 = rec["transcript"][2], rec["transcript"][4]
    assert (p0["turn"], p0["reward"], p0["tool_calls"]) == (0, 0.5, 1)
    assert (p1["turn"], p1["reward"], p1["tool_calls"]) == (1, 1.0, 0)
    assert rec["transcript"][3]["name"] == "calculator"
    assert rec["spans"] == [{"kind": "prompt", "text": "PROMPT"},
                            {"kind": "sampled", "text": "ab", "tokens": 2, "turn": 0},
                            {"kind": "env", "text": "cde", "tokens": 3},
                            {"kind": "sampled", "text": "f", "tokens": 1, "turn": 1}]
    assert rec["return"] == 1.5 and rec["success"] and rec["tool_calls"] == 1
    json.dumps(rec, allow_nan=False)
    assert "spans" not in episode_record(info)  # without a tokenizer: the transcript only
