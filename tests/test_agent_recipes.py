"""The agent recipes (recipes/agent_*.yaml): each loads and runs; the maze recipe's learning claim (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from postrl.config import load_config
from postrl.trainer.rl import train
from tests.conftest import read_metrics

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_maze_recipe_loads_and_runs_two_steps(tmp_path):
    cfg = load_config(RECIPES / "agent_maze_tiny.yaml", [
        "train.steps=2", "eval.before=false", "eval.after=false", "eval.every=0", f"run.output_dir={tmp_path}",
        "run.progress=false"])
    assert cfg.env.name == "maze" and cfg.model.name_or_path.startswith("tiny")
    from postrl.envs import build_env

    first = build_env("maze", cfg.env.kwargs).reset(seed=0)[0][0]["content"]  # the grid alone, no instructions
    assert set(first) <= set(".#AG\n") and first.count("A") == first.count("G") == 1
    run_dir, res = train(cfg)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2] and res["steps"] == 2
    for r in rows:
        assert r["episodes/turns_mean"] >= 1 and r["episodes/sampled_tokens_mean"] >= 1
        assert r["episodes/env_tokens_mean"] > 0 and r["grad_norm"] > 0
    logged = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert logged and "episode" in logged[0]["groups"][0]["best"]


def test_textarena_recipe_runs_a_step_with_a_tiny_model(tmp_path):
    pytest.importorskip("textarena", reason="the textarena recipe needs textarena (pip install 'postrl[agents]')")
    cfg = load_config(RECIPES / "agent_textarena_guess.yaml", [
        "model.name_or_path=tiny", "train.steps=1", "rollout.n=2", "env.max_turns=2", "train.mini_batch_size=4", "eval.before=false",
        "eval.after=false", f"run.output_dir={tmp_path}", "run.progress=false", "run.threads=1"])
    assert cfg.env.name == "textarena" and cfg.env.kwargs == {"env_id": "GuessTheNumber-v0"}
    run_dir, res = train(cfg)
    (row,) = read_metrics(run_dir)
    assert 1 <= row["episodes/turns_mean"] <= 2 and row["episodes/env_errors"] == 0


def test_calculator_recipe_and_its_demonstrations(tmp_path):
    from postrl.data.tool_demos import calculator_demos, main
    from postrl.envs import build_tools
    from postrl.envs.tools import format_tool_prompt
    from postrl.trainer.pipeline import check_stages

    cfg = load_config(RECIPES / "agent_calculator.yaml", [])
    sft, rl = check_stages(cfg)
    assert [s.kind for s in cfg.stages] == ["sft", "grpo"]
    assert rl.env.name == "arithmetic" and rl.env.tools == ["calculator"] and rl.algo.advantage == "gigpo"
    assert sft.sft.path == "runs/agent_calculator_sft.jsonl"
    demos = calculator_demos(5, seed=0)
    for d in demos:
        roles = [m["role"] for m in d["messages"]]
        assert roles == ["system", "user", "assistant", "tool", "assistant"]
        system, question, call, result, answer = (m["content"] for m in d["messages"])
        assert system == format_tool_prompt(build_tools(["calculator"]))  # what the episode runner writes
        a, _, b = question.removeprefix("What is ").split("?")[0].split()
        assert 100 <= int(a) <= 9999 and 100 <= int(b) <= 9999
        assert json.loads(call.removeprefix("<tool_call>").removesuffix("</tool_call>")) == {
            "name": "calculator", "arguments": {"expression": f"{a} * {b}"}}
        assert result == answer == str(int(a) * int(b))
    assert calculator_demos(5, seed=0) == demos and calculator_demos(5, seed=1) != demos  # seeded
    out = tmp_path / "d" / "demos.jsonl"
    assert main(["--out", str(out), "--size", "7"]) == 0
    assert len(out.read_text().splitlines()) == 7


class _Replay:
    """A backend that 'samples' given token ids, one scripted turn per generate call (one episode)."""

    reports_entropy = False

    def __init__(self, turns: list[list[int]]):
        self.turns = list(turns)

    def generate(self, prompts, params, seed=None, batch_size=0):
        import torch

        from postrl.rollout.generator import Generation

        ids = self.turns.pop(0)
        t = torch.tensor([ids])
        return Generation([list(prompts[0])], t, torch.ones_like(t), torch.zeros(1, len(ids)),
                          torch.tensor([False]), len(ids), torch.zeros(1, len(ids)))

    def close(self):
        pass


def test_calculator_demonstrations_are_the_tokens_of_a_solved_episode():
    """The SFT warm-up trains on exactly the token stream that RL later sees: an episode of the environment in
    which the policy samples the demonstration's assistant turns has the demonstration's SFT token ids, and its
    loss mask marks the same tokens (the SmolLM2 chat template, a character tokenizer)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from postrl.config.env import EnvConfig
    from postrl.data.sft import tokenize_record
    from postrl.data.tool_demos import DEMO_SEED_BASE, calculator_demos
    from postrl.envs import env_factory
    from postrl.rollout.episodes import EpisodeRunner, EpisodeTask
    from tests.test_episodes import CHARS, SMOLLM2

    vocab = {"<pad>": 0, "<unk>": 1, "<|im_start|>": 2, "<|im_end|>": 3}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = SMOLLM2
    for i, demo in enumerate(calculator_demos(3, seed=0)):
        ids, mask, _ = tokenize_record(tok, demo)
        msgs = demo["messages"]
        turns = [tok.encode(m["content"], add_special_tokens=False) + [tok.eos_token_id]
                 for m in msgs if m["role"] == "assistant"]
        runner = EpisodeRunner(_Replay(turns), tok, env_factory(EnvConfig(name="arithmetic", kwargs={"digits": [3, 4]},
                                                                          tools=["calculator"])),
                               max_turns=3, max_tokens_per_turn=128, max_episode_tokens=512)
        batch = runner.run([EpisodeTask(seed=DEMO_SEED_BASE + i)], 1)
        info = batch.episodes[0]
        assert info.success and info.tool_calls == 1 and info.turns == 2
        n = int(batch.attention_mask[0].sum())
        episode = list(batch.prompt_ids[0]) + batch.completion_ids[0, :n].tolist()
        assert episode == ids[:len(episode)] and ids[len(episode):] == tok.encode("\n", add_special_tokens=False)
        P = len(batch.prompt_ids[0])
        rl = [0] * P + batch.loss_mask[0, :n].int().tolist()
        sft = mask[:len(episode)]
        # the same tokens are trained, except that SFT also trains the chat template's newline after each
        # <|im_end|> (part of the assistant message's rendering), which RL receives in the next delta
        extra = [j for j in range(len(episode)) if sft[j] and not rl[j]]
        assert all(rl[j] <= sft[j] for j in range(len(episode)))
        assert extra == [j for j in range(1, len(episode)) if episode[j - 1] == tok.eos_token_id and rl[j - 1]]
        assert all(tok.decode([episode[j]]) == "\n" for j in extra) and len(extra) == 1


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_maze_recipe_learns(tmp_path, seed):
    """The recipe's claim (docs/agents.md): held-out greedy success <= 10% before, >= 60% after. Measured on the
    development machine: 0 -> 96 / 66 / 68% for seeds 0 / 1 / 2, ~1 minute each; the policy still moves by up to
    +-0.4 between evaluations after it has learned, so another machine's floating-point order can land a seed
    below 60% (the docs give the per-step curves)."""
    cfg = load_config(RECIPES / "agent_maze_tiny.yaml", [f"run.seed={seed}", f"run.output_dir={tmp_path}",
                                                          "run.progress=false"])
    _, res = train(cfg)
    assert res["eval_before"]["accuracy"] <= 0.10
    assert res["eval_after"]["accuracy"] >= 0.60, res["eval_after"]
