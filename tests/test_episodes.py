"""Multi-turn episodes, token in and token out (postrl/rollout/episodes.py).

Tiny character-level tokenizers carry SmolLM2-, Qwen2.5-, Qwen3- (strips earlier <think>) and Llama-3-style
chat templates; a scripted backend samples random token ids (special tokens included) so that hundreds of
random episodes run in a second, and a tiny Llama checks the training forward's log-probs against the
sampler's.
"""

from __future__ import annotations

import random
import string

import pytest
import torch

from postrl.models.logprobs import completion_logprobs
from postrl.rollout.episodes import ChatDelta, EpisodeBatch, EpisodeRunner, EpisodeTask, episode_metrics
from postrl.rollout.generator import Generation, SamplingParams


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models decode faster on one thread than on two shared cores (conftest restores the count)."""
    torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------- #
# tiny tokenizers with real-style chat templates
# --------------------------------------------------------------------------------------------- #

SMOLLM2 = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2.5 style: tools in the system message, tool results grouped in one user turn of <tool_response> blocks
# (text is written with {{- '...' }} so that the whitespace control of the tags keeps the newlines, as Qwen's do)
QWEN25 = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are Qwen.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n<tools>' }}{%- for t in tools %}{{- '\\n' }}{{- t | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}{%- if not (loop.first and tools) %}"
    "{{- '<|im_start|>system\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen3 style: assistant turns before the last user query lose their <think> block; the last assistant
# turn after it gets an (empty) one when it is the last message
QWEN3 = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{%- set content = m.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3 = (
    "{{- '<|begin_of_text|>' }}"
    "{%- for m in messages %}"
    "{%- set role = 'ipython' if m.role == 'tool' else m.role %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\n\n' + m.content | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)

CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<think>", "</think>"]
STYLES = {
    "smollm2": (SMOLLM2, CHATML_SPECIALS, "<|im_end|>"),
    "qwen25": (QWEN25, CHATML_SPECIALS, "<|im_end|>"),
    "qwen3": (QWEN3, CHATML_SPECIALS, "<|im_end|>"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                        "<|end_of_text|>"], "<|eot_id|>"),
}
CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"


def chat_tokenizer(style: str):
    """A character-level fast tokenizer whose special tokens and chat template follow ``style``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    template, specials, eos = STYLES[style]
    vocab = {"<pad>": 0, "<unk>": 1}
    for tok in specials:
        vocab[tok] = len(vocab)
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token=eos,
                                  additional_special_tokens=specials)
    tok.chat_template = template
    return tok


# --------------------------------------------------------------------------------------------- #
# a scripted backend and a random environment
# --------------------------------------------------------------------------------------------- #

class ScriptedBackend:
    """Samples random ids (content characters and special tokens), ending with EOS with probability
    ``p_stop`` per token; records every call."""

    name = "scripted"
    reports_entropy = True

    def __init__(self, tokenizer, p_stop: float = 0.25, eos_ids=None):
        self.tok = tokenizer
        self.p_stop = p_stop
        self.eos = eos_ids or [tokenizer.eos_token_id]
        specials = [i for i in tokenizer.all_special_ids if i not in (tokenizer.pad_token_id, tokenizer.unk_token_id)]
        content = [tokenizer.convert_tokens_to_ids(c) for c in CHARS]
        self.pool = content * 4 + [i for i in specials if i not in self.eos]
        self.calls: list[tuple[list[list[int]], list[list[int]], list[list[float]]]] = []

    def generate(self, prompts, params, seed=None, batch_size=0):
        rng = random.Random(seed)
        outs, lps = [], []
        for _ in prompts:
            ids = []
            while len(ids) < params.max_new_tokens:
                if rng.random() < self.p_stop:
                    ids.append(rng.choice(self.eos))
                    break
                ids.append(rng.choice(self.pool))
            outs.append(ids)
            lps.append([-rng.random() * 5 for _ in ids])
        self.calls.append(([list(p) for p in prompts], outs, lps))
        B, T = len(prompts), max(len(o) for o in outs)
        cid = torch.zeros((B, T), dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        lp = torch.zeros((B, T))
        for i, (o, l) in enumerate(zip(outs, lps)):
            cid[i, :len(o)] = torch.tensor(o)
            mask[i, :len(o)] = 1
            lp[i, :len(o)] = torch.tensor(l)
        truncated = torch.tensor([o[-1] not in self.eos for o in outs])
        return Generation([list(p) for p in prompts], cid, mask, lp, truncated, T, lp.abs())

    def sync_weights(self, model):
        pass

    def close(self):
        pass


class RandomEnv:
    """Random observations (user or tool messages, several at a time, with newlines and markup), rewards and
    lengths; raises in ``step`` with probability ``p_raise``. Records what it returned."""

    def __init__(self, p_raise: float = 0.0, tool_role: bool = True):
        self.p_raise, self.tool_role = p_raise, tool_role
        self.log: list[dict] = []

    def _obs(self):
        msgs = []
        for _ in range(self.rng.choice([0, 1, 1, 1, 2])):
            role = "tool" if self.tool_role and self.rng.random() < 0.5 else "user"
            text = "".join(self.rng.choice(string.ascii_letters + " \n<>/{}\"") for _ in range(self.rng.randint(1, 12)))
            msgs.append({"role": role, "content": text.strip() or "x"})
        return msgs

    made = 0

    def reset(self, sample=None, seed=None):
        RandomEnv.made += 1
        self.rng = random.Random((seed or 0) * 7919 + RandomEnv.made)
        self.first = [{"role": "user", "content": f"task {seed}"}]
        return self.first, {"state_key": "start"}

    def step(self, action):
        if self.rng.random() < self.p_raise:
            raise RuntimeError("environment bug")
        obs, reward, done = self._obs(), round(self.rng.uniform(-1, 1), 3), self.rng.random() < 0.15
        self.log.append({"action": action, "obs": obs, "reward": reward, "done": done})
        return obs, reward, done, {"state_key": self.rng.randrange(3)}


def _run(style: str, n_tasks: int, group: int, seed: int, **kw):
    tok = chat_tokenizer(style)
    backend = ScriptedBackend(tok, p_stop=kw.pop("p_stop", 0.25))
    envs: list[RandomEnv] = []
    p_raise = kw.pop("p_raise", 0.0)

    def make():
        envs.append(RandomEnv(p_raise))
        return envs[-1]

    runner = EpisodeRunner(backend, tok, make, sampling=SamplingParams(temperature=1.0), **kw)
    batch = runner.run([EpisodeTask(seed=seed * 100 + g) for g in range(n_tasks)], group, seed=seed)
    return tok, backend, envs, runner, batch


def _check_exact(tok, backend, envs, runner, batch: EpisodeBatch) -> int:
    """Every stored row is the sampled ids of each turn (as the backend returned them, cut only at the token
    budget) with the environment's deltas between them; returns the number of episodes checked."""
    render = ChatDelta(tok)
    # every generate call: prompt -> what was sampled for it
    sampled_for = {}
    for prompts, outs, lps in backend.calls:
        for p, o, lp in zip(prompts, outs, lps):
            sampled_for.setdefault(tuple(p), []).append((o, lp))
    eos = set(backend.eos)
    for i in range(len(batch)):
        info = batch.episodes[i]
        n = int(batch.attention_mask[i].sum())
        row = batch.completion_ids[i, :n].tolist()
        assert batch.attention_mask[i, :n].all() and not batch.attention_mask[i, n:].any()
        prompt = batch.prompt_ids[i]
        pos, turns, sampled_total = 0, 0, 0
        segs = info.segments
        assert [s[0] for s in segs] == ["sampled", "env"] * (len(segs) // 2) + ["sampled"] * (len(segs) % 2)
        for kind, start, end in segs:
            assert start == pos
            if kind == "sampled":
                kept = row[start:end]
                candidates = sampled_for[tuple(prompt + row[:start])]  # equal histories may be sampled twice
                match = [c for c in candidates if c[0][:len(kept)] == kept]
                assert match, "stored ids differ from the sampled ids"
                got, lp = match[0]
                candidates.remove(match[0])
                assert len(kept) == len(got) or end == runner.max_episode_tokens, "only the budget may cut a turn"
                assert batch.behaviour_logprobs[i, start:end].tolist() == pytest.approx(lp[:len(kept)])
                assert (batch.turn_ids[i, start:end] == turns).all()
                assert batch.loss_mask[i, start:end].eq(1).all()
                sampled_total += len(kept)
                turns += 1
                last, stopped = kept[-1], kept[-1] in eos and len(kept) == len(got)
                action = tok.decode(kept, skip_special_tokens=True)
            else:
                env_log = envs[i].log[turns - 1]
                assert env_log["action"] == action
                assert row[start:end] == render.delta(env_log["obs"], last, stopped)
                assert batch.loss_mask[i, start:end].eq(0).all()
                assert batch.behaviour_logprobs[i, start:end].eq(0).all()
                assert (batch.turn_ids[i, start:end] == -1).all()
            pos = end
        assert pos == n
        assert int(batch.loss_mask[i].sum()) == sampled_total == info.sampled_tokens
        assert info.turns == turns
    return len(batch)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_token_exactness_over_random_episodes(style):
    checked = 0
    for seed in range(4):
        out = _run(style, n_tasks=8, group=4, seed=seed, max_turns=6, max_tokens_per_turn=12,
                   max_episode_tokens=160, max_active=12, p_raise=0.03)
        checked += _check_exact(*out)
        batch = out[-1]
        ends = {e.end for e in batch.episodes}
        assert ends <= {"done", "max_turns", "token_budget", "env_error"}
    assert checked == 128


def test_all_end_reasons_occur_and_are_recorded():
    tok, backend, envs, runner, batch = _run("qwen25", n_tasks=16, group=4, seed=3, max_turns=3,
                                             max_tokens_per_turn=10, max_episode_tokens=90, max_active=16,
                                             p_raise=0.1)
    ends = [e.end for e in batch.episodes]
    assert {"done", "max_turns", "token_budget", "env_error"} <= set(ends)
    for e, trunc in zip(batch.episodes, batch.truncated.tolist()):
        assert trunc == (e.end in ("max_turns", "token_budget"))
        assert e.env_errors == (e.end == "env_error")
        assert len(e.turn_rewards) == e.turns <= 3
        assert e.sampled_tokens + e.env_tokens <= 90
    m = episode_metrics(batch)
    assert m["episodes/env_errors"] == ends.count("env_error") > 0
    assert sum(m[f"episodes/end/{r}"] for r in ("done", "max_turns", "token_budget", "env_error")) == pytest.approx(1)


def test_rewards_sit_on_the_last_sampled_token_of_each_turn():
    from postrl.algorithms.advantages import last_token_rewards

    tok, backend, envs, runner, batch = _run("smollm2", n_tasks=6, group=3, seed=5, max_turns=5,
                                             max_tokens_per_turn=8, max_episode_tokens=200)
    R = last_token_rewards(batch.rewards.float(), batch.loss_mask) + batch.token_rewards
    for i, e in enumerate(batch.episodes):
        stepped = [log["reward"] for log in envs[i].log]
        assert e.turn_rewards[:len(stepped)] == stepped
        assert float(R[i].sum()) == pytest.approx(e.episode_return, abs=1e-5)
        for k, r in enumerate(stepped):  # at the last token of turn k, nowhere else in it
            pos = (batch.turn_ids[i] == k).nonzero().flatten()
            assert float(R[i, pos[-1]]) == pytest.approx(r, abs=1e-6)
            assert R[i, pos[:-1]].abs().sum() == 0
        assert R[i][batch.loss_mask[i] == 0].abs().sum() == 0


def test_delta_restores_the_newline_the_model_did_not_sample():
    tok = chat_tokenizer("smollm2")
    render = ChatDelta(tok)
    eos = tok.eos_token_id
    obs = [{"role": "user", "content": "You hit a wall."}]
    ended = tok.decode(render.delta(obs, eos, True))
    assert ended == "\n<|im_start|>user\nYou hit a wall.<|im_end|>\n<|im_start|>assistant\n"
    cut = tok.decode(render.delta(obs, tok.convert_tokens_to_ids("a"), False))
    assert cut == "<|im_end|>" + ended
    # a re-tokenized conversation and the token history agree, text and ids, for this template
    prompt, _ = render.prompt([{"role": "user", "content": "go"}])
    sampled = tok.encode("left", add_special_tokens=False) + [eos]
    history = prompt + sampled + render.delta(obs, eos, True)
    full = tok.apply_chat_template([{"role": "user", "content": "go"}, {"role": "assistant", "content": "left"}] + obs,
                                   add_generation_prompt=True, tokenize=False)
    assert tok.decode(history) == full
    assert history == tok.encode(full, add_special_tokens=False)


def test_qwen3_think_blocks_stay_in_the_history_the_template_would_drop():
    tok = chat_tokenizer("qwen3")
    render = ChatDelta(tok)
    eos = tok.eos_token_id
    prompt, _ = render.prompt([{"role": "user", "content": "q"}])
    turn1 = tok.encode("<think>\nhmm\n</think>\n\nA", add_special_tokens=False) + [eos]
    obs = [{"role": "user", "content": "again"}]
    history = prompt + turn1 + render.delta(obs, eos, True)
    text = tok.decode(history)
    assert "<think>\nhmm\n</think>" in text  # kept as sampled
    rerendered = tok.apply_chat_template([{"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nA"}] + obs,
                                         add_generation_prompt=True, tokenize=False)
    assert "hmm" not in rerendered  # a runner that re-renders would rewrite the sampled turn
    assert history[:len(prompt) + len(turn1)] == prompt + turn1
    assert text.endswith("<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n")


def test_llama3_tool_delta():
    tok = chat_tokenizer("llama3")
    render = ChatDelta(tok)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    d = tok.decode(render.delta([{"role": "tool", "content": "42"}], eot, True))
    assert d == "<|start_header_id|>ipython<|end_header_id|>\n\n42<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


def test_continuous_batching_keeps_at_most_max_active_and_refills():
    tok, backend, envs, runner, batch = _run("smollm2", n_tasks=6, group=2, seed=1, max_turns=6,
                                             max_tokens_per_turn=6, max_episode_tokens=200, max_active=4)
    sizes = runner.generate_calls
    assert max(sizes) == 4
    assert len(backend.calls) == len(sizes)
    total_turns = sum(e.turns for e in batch.episodes)
    assert sum(sizes) == total_turns  # one generate row per model turn
    # episodes that started later decoded in the same call as older ones (they joined while others ran)
    first_turn_calls = []
    for c, (prompts, _, _) in enumerate(backend.calls):
        for p in prompts:
            for i in range(len(batch)):
                if list(p) == batch.prompt_ids[i] and i not in [x[0] for x in first_turn_calls]:
                    first_turn_calls.append((i, c))
    later = [c for i, c in first_turn_calls if i >= 4]
    assert later and min(later) > 0
    assert len(sizes) < total_turns  # decoded together, not one episode at a time


def test_reset_error_is_counted_and_the_rest_run():
    tok = chat_tokenizer("smollm2")
    backend = ScriptedBackend(tok)
    count = {"n": 0}

    class Flaky(RandomEnv):
        def reset(self, sample=None, seed=None):
            count["n"] += 1
            if count["n"] == 2:
                raise ValueError("cannot start")
            return super().reset(sample, seed)

    batch = EpisodeRunner(backend, tok, Flaky, max_tokens_per_turn=5).run([EpisodeTask(seed=1)], 3, seed=0)
    assert [e.end == "reset_error" for e in batch.episodes] == [False, True, False]
    assert batch.episodes[1].env_errors == 1 and int(batch.attention_mask[1].sum()) == 0
    assert batch.loss_mask[1].sum() == 0 and batch.prompt_ids[1]


def test_episode_batch_select_and_concat_keep_turn_fields():
    tok, backend, envs, runner, batch = _run("smollm2", n_tasks=3, group=2, seed=2, max_tokens_per_turn=5)
    part = batch.select([2, 3])
    assert isinstance(part, EpisodeBatch) and part.episodes == batch.episodes[2:4]
    assert torch.equal(part.turn_ids, batch.turn_ids[2:4])
    both = EpisodeBatch.concat([part, batch.select([0, 1])], tok.pad_token_id)
    assert isinstance(both, EpisodeBatch) and both.group_ids.tolist() == [0, 0, 1, 1]
    w = part.turn_ids.shape[1]
    assert torch.equal(both.turn_ids[:2, :w], part.turn_ids)
    assert (both.turn_ids[:2, w:] == -1).all()


def test_training_forward_logprobs_equal_the_sampler_on_sampled_tokens(tmp_path):
    """A tiny Llama samples through the torch backend; the trainer's forward over prompt + completion (env
    tokens attended, not trained) reproduces every sampled token's log-prob to 1e-5."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from postrl.rollout.backend import TorchBackend

    worst = 0.0
    for style in ("qwen25", "llama3"):
        tok = chat_tokenizer(style)
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        model = LlamaForCausalLM(cfg).eval()
        with torch.no_grad():  # make the end-of-turn token likely so that turns end on their own
            model.lm_head.weight[tok.eos_token_id] *= 0
            model.model.norm.weight.abs_()
        backend = TorchBackend(model, [tok.eos_token_id], tok.pad_token_id)
        runner = EpisodeRunner(backend, tok, lambda: RandomEnv(0.0), max_turns=4, max_tokens_per_turn=8,
                               max_episode_tokens=100, max_active=4, sampling=SamplingParams(temperature=0.9))
        batch = runner.run([EpisodeTask(seed=s) for s in range(3)], 2, seed=7)
        with torch.no_grad():
            lp, _ = completion_logprobs(model, batch.prompt_ids, batch.completion_ids, batch.attention_mask,
                                        tok.pad_token_id, temperature=0.9)
        m = batch.loss_mask.bool()
        assert m.sum() > 30 and (batch.attention_mask.sum() > batch.loss_mask.sum())
        worst = max(worst, float((lp - batch.behaviour_logprobs)[m].abs().max()))
        assert sum(e.turns for e in batch.episodes) > len(batch)  # multi-turn
    assert worst < 1e-5


def test_runner_from_config_plays_a_built_in_environment_with_tools():
    from postrl.config.env import EnvConfig
    from postrl.config.rl import RolloutConfig
    from postrl.rollout.episodes import runner_from_config

    tok = chat_tokenizer("qwen25")
    backend = ScriptedBackend(tok, p_stop=0.3)
    env_cfg = EnvConfig(name="guess_number", kwargs={"high": 5}, tools=["calculator"], max_turns=3,
                        max_episode_tokens=400, max_active=3)
    runner = runner_from_config(env_cfg, RolloutConfig(max_new_tokens=6, temperature=0.7), backend, tok,
                                system_prompt="Play well.")
    assert (runner.max_tokens_per_turn, runner.max_turns, runner.sampling.temperature) == (6, 3, 0.7)
    batch = runner.run([EpisodeTask(seed=1), EpisodeTask(seed=2)], 2, seed=0)
    prompt = batch.prompt_texts[0]
    assert "Play well." in prompt and '"name": "calculator"' in prompt and "# Tools" in prompt  # via the template
    assert all(e.turns >= 1 for e in batch.episodes) and len(backend.calls) >= 1
