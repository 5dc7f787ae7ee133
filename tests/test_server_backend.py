"""The ``openai_server`` generation backend against a real HTTP server (tests/fake_openai_server.py: stdlib
http.server running postrl's torch Generator), its failure modes, the managed server, weight sync, the
trainer's mismatch metrics and the asynchronous bounded-staleness pipeline."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import read_metrics  # noqa: E402
from fake_openai_server import FakeServer  # noqa: E402

from postrl.algorithms.policy_losses import logprob_mismatch  # noqa: E402
from postrl.config import ConfigError, load_config  # noqa: E402
from postrl.models.loading import load_model_and_tokenizer  # noqa: E402
from postrl.models.logprobs import completion_logprobs  # noqa: E402
from postrl.rollout.backend import BACKENDS, build_backend  # noqa: E402
from postrl.rollout.generator import SamplingParams  # noqa: E402
from postrl.rollout.server import ServerError  # noqa: E402

TESTS = Path(__file__).parent


@pytest.fixture
def model_and_tok(tiny_model_dir):
    model, tok, _ = load_model_and_tokenizer(str(tiny_model_dir))
    return model.eval(), tok


@pytest.fixture
def fake(tiny_model_dir):
    servers = []

    def make(name: str = "fake-model", model_dir=None) -> FakeServer:
        s = FakeServer(str(model_dir or tiny_model_dir), name).start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


def backend(model, tok, urls, **kw):
    kw.setdefault("served_model_name", "fake-model")
    kw.setdefault("retry_backoff_s", 0.01)
    return build_backend("openai_server", model, tok, urls=urls, **kw)


def prompts(tok, n=8):
    return [tok.encode(f"copy {i % 10} then {i * 7} ab") for i in range(n)]


def test_registered():
    assert "openai_server" in BACKENDS


def test_greedy_equals_torch_backend_token_for_token(model_and_tok, fake):
    model, tok = model_and_tok
    b = backend(model, tok, [fake().url])
    try:
        ps = prompts(tok, 12)
        params = SamplingParams(10, temperature=0.0)
        got, want = b.generate(ps, params), build_backend("torch", model, tok).generate(ps, params)
        assert torch.equal(got.completion_ids, want.completion_ids)
        assert torch.equal(got.completion_mask, want.completion_mask)
        assert torch.equal(got.truncated, want.truncated)
        assert (got.logprobs - want.logprobs).abs().max() < 1e-5
        assert got.prompt_ids == ps and b.reports_entropy is False
        assert float(got.entropy.abs().sum()) == 0.0
    finally:
        b.close()


def test_sampled_logprobs_equal_trainer_forward(model_and_tok, fake):
    model, tok = model_and_tok
    b = backend(model, tok, [fake().url])
    try:
        ps = [p for p in prompts(tok, 4) for _ in range(3)]
        gen = b.generate(ps, SamplingParams(8, temperature=0.8), seed=3)
        again = b.generate(ps, SamplingParams(8, temperature=0.8), seed=3)
        assert torch.equal(gen.completion_ids, again.completion_ids)  # per-request seeds: reproducible
        assert len({tuple(r.tolist()) for r in gen.completion_ids[:3]}) > 1  # a group's rows differ
        lp, _ = completion_logprobs(model, ps, gen.completion_ids, gen.completion_mask, tok.pad_token_id, 0.8)
        m = gen.completion_mask.bool()
        assert (lp[m] - gen.logprobs[m]).abs().max() < 1e-5
        assert logprob_mismatch(lp, gen.logprobs, gen.completion_mask)["max_abs"] < 1e-5
    finally:
        b.close()


def test_min_new_tokens_reaches_the_server_as_min_tokens(model_and_tok, fake):
    model, tok = model_and_tok
    ps = prompts(tok, 6)
    free = build_backend("torch", model, tok).generate(ps, SamplingParams(8, temperature=0.0))
    first = int(free.completion_ids[0, 0])  # row 0's first greedy token, made an end-of-sequence id below
    b = backend(model, tok, [fake().url])
    try:
        b.eos = b.eos | {first}  # the request's stop_token_ids
        early = b.generate(ps, SamplingParams(8, temperature=0.0))
        held = b.generate(ps, SamplingParams(8, temperature=0.0, min_new_tokens=3))
        assert int(early.lengths[0]) == 1  # ends at once without min_tokens
        assert (held.lengths >= 3).all()
        assert not torch.isin(held.completion_ids[:, :3], torch.tensor(sorted(b.eos))).any()
    finally:
        b.close()


def test_round_robin_over_two_servers(model_and_tok, fake):
    model, tok = model_and_tok
    s1, s2 = fake(), fake()
    b = backend(model, tok, [s1.url, s2.url])
    try:
        b.generate(prompts(tok, 6), SamplingParams(3, temperature=0.0))
        assert s1.completions == 3 and s2.completions == 3
    finally:
        b.close()


def test_weight_sync_makes_the_server_sample_from_the_updated_model(model_and_tok, fake, tmp_path):
    model, tok = model_and_tok
    server = fake()
    b = backend(model, tok, [server.url], sync_dir=tmp_path / "sync")
    try:
        ps, params = prompts(tok, 6), SamplingParams(6, temperature=0.0)
        before = b.generate(ps, params)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        stale = b.generate(ps, params)
        assert (stale.logprobs - before.logprobs).abs().max() < 1e-6  # nothing synced yet
        b.sync_weights(model)
        assert server.reloads == [str(tmp_path / "sync" / "model")]
        after, want = b.generate(ps, params), build_backend("torch", model, tok).generate(ps, params)
        assert torch.equal(after.completion_ids, want.completion_ids)
        assert (after.logprobs - want.logprobs).abs().max() < 1e-5
        assert (after.logprobs - before.logprobs).abs().max() > 1e-3
        assert b.metrics()["server/syncs"] == 1
    finally:
        b.close()


def test_written_weights_hold_the_tied_output_head(model_and_tok, tmp_path):
    """vLLM's in-place reload keeps a tied head it finds nothing for: the head is written under its own name."""
    from safetensors.torch import load_file

    from postrl.rollout.server import save_hf_weights

    model, tok = model_and_tok
    assert model.config.tie_word_embeddings
    save_hf_weights(model, tmp_path / "w", tok)
    st = load_file(str(tmp_path / "w" / "model.safetensors"))
    assert torch.equal(st["lm_head.weight"], st["model.embed_tokens.weight"])
    assert set(st) >= set(model.state_dict())
    save_hf_weights(model, tmp_path / "w")  # rewritten in place, the tokenizer files kept
    assert (tmp_path / "w" / "tokenizer.json").is_file() or (tmp_path / "w" / "tokenizer_config.json").is_file()


def test_lora_adapter_is_hot_loaded_by_path(model_and_tok, fake, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok = model_and_tok
    server = fake()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    b = backend(peft_model, tok, [server.url], lora={"rank": 4}, sync_dir=tmp_path / "sync")
    try:
        assert b.weight_sync == "lora"
        ps, params = prompts(tok, 4), SamplingParams(6, temperature=0.0)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        for _ in range(2):  # the second sync replaces the first adapter
            b.sync_weights(peft_model)
            got = b.generate(ps, params)
            want = build_backend("torch", peft_model, tok).generate(ps, params)
            assert torch.equal(got.completion_ids, want.completion_ids)
            assert (got.logprobs - want.logprobs).abs().max() < 1e-5
            with torch.no_grad():
                for name, p in peft_model.named_parameters():
                    if "lora_B" in name:
                        p.add_(0.3)
        assert list(server.adapters) == ["postrl-adapter-2"]
        assert (tmp_path / "sync" / "adapter-2" / "adapter_config.json").is_file()
        assert not (tmp_path / "sync" / "adapter-1").exists()
    finally:
        b.close()


def test_lora_model_with_full_weight_reload_is_written_merged(model_and_tok, fake):
    from peft import LoraConfig, get_peft_model

    model, tok = model_and_tok
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    b = backend(peft_model, tok, [fake().url], lora={"rank": 2}, weight_sync="reload")
    try:
        b.sync_weights(peft_model)
        ps, params = prompts(tok, 4), SamplingParams(6, temperature=0.0)
        got, want = b.generate(ps, params), build_backend("torch", peft_model, tok).generate(ps, params)
        assert torch.equal(got.completion_ids, want.completion_ids)
        assert (got.logprobs - want.logprobs).abs().max() < 1e-5
    finally:
        b.close()


# ----- failure modes: a clear error or a counted retry, never a silent wrong batch ---------------------------


def test_server_down_is_a_clear_error(model_and_tok):
    import socket

    model, tok = model_and_tok
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    with pytest.raises(ServerError, match=r"cannot reach http://127.0.0.1:\d+/v1/models.*Is the server running"):
        backend(model, tok, [f"http://127.0.0.1:{port}"], retries=2)
    assert time.time() - t0 < 5


def test_server_of_another_model_is_refused(model_and_tok, fake):
    model, tok = model_and_tok
    server = fake("someone-else")
    with pytest.raises(ServerError, match=r"serves \['someone-else'\], not rollout.served_model_name='fake-model'"):
        backend(model, tok, [server.url])
    b = backend(model, tok, [server.url], served_model_name="")  # "": the server's only model
    assert b.served_model_name == "someone-else"
    b.close()


@pytest.mark.parametrize("fault,kind,times", [("500", "http_500", 2), ("malformed", "malformed", 1),
                                              ("short", "malformed", 1), ("drop", "connection", 1)])
def test_failed_answers_are_retried_counted_and_then_an_error(model_and_tok, fake, fault, kind, times):
    """An HTTP 500, malformed JSON, too few log-probs or a dropped connection: retried (the batch equals a clean
    one), counted per kind; four failures in a row (retries=3) are a ServerError."""
    model, tok = model_and_tok
    server = fake()
    b = backend(model, tok, [server.url], max_concurrency=1)
    try:
        ps, params = prompts(tok, 3), SamplingParams(4, temperature=0.0)
        clean = b.generate(ps, params)
        server.faults = [fault] * times
        got = b.generate(ps, params)
        assert torch.equal(got.completion_ids, clean.completion_ids)
        assert torch.equal(got.logprobs, clean.logprobs)
        m = b.metrics()
        assert m["server/retries"] == times and m[f"server/retries/{kind}"] == times
        server.faults = [fault] * 4
        with pytest.raises(ServerError, match="gave up after 4 attempts"):
            b.generate(ps[:1], params)
    finally:
        b.close()


def test_timeout_is_retried_then_an_error(model_and_tok, fake):
    model, tok = model_and_tok
    server = fake()
    b = backend(model, tok, [server.url], timeout_s=0.5, retries=1, max_concurrency=1)
    try:
        params = SamplingParams(3, temperature=0.0)
        server.faults = ["sleep:1.5"]
        b.generate(prompts(tok, 1), params)
        assert b.metrics()["server/retries/timeout"] == 1
        server.faults = ["sleep:1.5", "sleep:1.5"]
        with pytest.raises(ServerError, match="did not answer within timeout_s=0.5 s"):
            b.generate(prompts(tok, 1), params)
    finally:
        b.close()


def test_answer_that_does_not_fit_the_request_is_never_used(model_and_tok, fake):
    model, tok = model_and_tok
    b = backend(model, tok, [fake().url], retries=0)
    try:
        assert not {20, 21, 22} & b.eos
        good = {"choices": [{"token_ids": [20, 21], "logprobs": {"token_logprobs": [-0.1, -0.2]}}]}
        assert b._parse(good, 4) == ([20, 21], [-0.1, -0.2])
        by_text = {"choices": [{"logprobs": {"tokens": ["token_id:20"], "token_logprobs": [-0.1]}}]}
        assert b._parse(by_text, 4) == ([20], [-0.1])
        eos = next(iter(b.eos))
        cut = {"choices": [{"token_ids": [20, eos, 22], "logprobs": {"token_logprobs": [-0.1, -0.2, -0.3]}}]}
        assert b._parse(cut, 4) == ([20, eos], [-0.1, -0.2])  # ends at the first EOS, as the torch generator
        from postrl.rollout.server import _Retryable

        for bad in ({"choices": [{"token_ids": [20, 21, 22], "logprobs": {"token_logprobs": [-1.0] * 3}}]},  # > max
                    {"choices": [{"token_ids": [10**7], "logprobs": {"token_logprobs": [-1.0]}}]},  # not in vocab
                    {"choices": [{"token_ids": [20], "logprobs": {"token_logprobs": [0.5]}}]},  # not a log-prob
                    {"choices": [{"token_ids": [20], "logprobs": None}]}, {"error": "x"}, None):
            with pytest.raises(_Retryable):
                b._parse(bad, 2)
    finally:
        b.close()


# ----- the managed server ----------------------------------------------------------------------------------


def managed_spec(**kw):
    return {"python": sys.executable, "module": "fake_openai_server", "startup_timeout": 120,
            "env": {"PYTHONPATH": str(TESTS)}, **kw}


def test_managed_server_starts_on_the_trainers_weights_and_stops_on_close(model_and_tok):
    model, tok = model_and_tok
    b = build_backend("openai_server", model, tok, server=managed_spec(), weight_sync="restart")
    proc = b.managed.proc
    try:
        assert b.served_model_name == "postrl-policy" and proc.poll() is None
        ps, params = prompts(tok, 4), SamplingParams(5, temperature=0.0)
        want = build_backend("torch", model, tok)
        assert torch.equal(b.generate(ps, params).completion_ids, want.generate(ps, params).completion_ids)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        b.sync_weights(model)  # restart on the new weights
        assert b.managed.starts == 2 and proc.poll() is not None
        proc = b.managed.proc
        got, exp = b.generate(ps, params), want.generate(ps, params)
        assert torch.equal(got.completion_ids, exp.completion_ids)
        assert (got.logprobs - exp.logprobs).abs().max() < 1e-5
    finally:
        b.close()
    assert proc.wait(timeout=30) is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # the whole process group is gone


def test_managed_server_that_fails_to_start_shows_its_log(model_and_tok, tmp_path):
    model, tok = model_and_tok
    with pytest.raises(ServerError, match=r"exited with code \d+ while starting(.|\n)*No module named"):
        build_backend("openai_server", model, tok, server=managed_spec(module="no_such_server_module"))
    with pytest.raises(ServerError, match="is not an executable"):
        build_backend("openai_server", model, tok, server={"python": str(tmp_path / "nope")})


def test_managed_server_dies_with_postrl(tiny_model_dir, tmp_path):
    """A postrl process killed with SIGKILL (no cleanup runs) still takes its server down (PDEATHSIG)."""
    import subprocess

    code = f"""
import sys, time
sys.path.insert(0, {str(TESTS)!r})
from postrl.models.loading import load_model_and_tokenizer
from postrl.rollout.backend import build_backend
model, tok, _ = load_model_and_tokenizer({str(tiny_model_dir)!r})
b = build_backend("openai_server", model, tok, server={managed_spec()!r})
print(b.managed.proc.pid, flush=True)
time.sleep(120)
"""
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(p.stdout.readline())
    finally:
        p.kill()
        p.wait()
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("the managed server outlived postrl")


# ----- config and the trainer ------------------------------------------------------------------------------


def test_config_keys_are_checked():
    with pytest.raises(ConfigError, match="rollout.sync_every"):
        load_config(None, ["rollout.sync_every=0"])
    with pytest.raises(ConfigError, match="rollout.weight_sync"):
        load_config(None, ["rollout.weight_sync=nccl"])
    with pytest.raises(ConfigError, match="rollout.urls.0"):
        load_config(None, ["rollout.backend=openai_server", "rollout.urls=[localhost:8000]"])
    with pytest.raises(ConfigError, match="set rollout.backend=openai_server"):
        load_config(None, ["rollout.urls=[http://127.0.0.1:8000]"])


def served(tiny_config, url, *extra):
    return tiny_config("rollout.backend=openai_server", f"rollout.urls=[{url}]", "rollout.served_model_name=fake-model",
                       "rollout.max_new_tokens=3", "rollout.temperature=1.0", *extra)


def test_train_through_the_server_syncs_weights_and_reports_the_mismatch(tiny_config, fake, tmp_path):
    from postrl.trainer.rl import train

    server = fake()
    run_dir, _ = train(served(tiny_config, server.url, "train.steps=3"))
    rows = [r for r in read_metrics(run_dir) if "mismatch/kl" in r]
    assert len(rows) == 3
    for r in rows:  # the server samples from the weights the trainer has: no mismatch beyond float noise
        assert r["mismatch/max_abs"] < 1e-4 and 0 <= r["mismatch/kl"] < 1e-8
        assert r["staleness_max"] == 0 and r["server/retries"] == 0, r
    assert len(server.reloads) == 4  # at the start (an external server may hold other weights), after each update


def varied_reward(text, gold):
    """A reward that differs between the completions of a group (so every step updates the tiny model)."""
    return float(len(set(text)))


def test_mismatch_is_reported_when_the_server_lags(tiny_config, fake):
    """weight_sync=none: the server keeps the starting weights while the trainer learns; the mismatch grows and
    the recomputed old log-probs (not the server's) go into the ratio."""
    from postrl.trainer.rl import train

    server = fake()
    run_dir, _ = train(served(tiny_config, server.url, "train.steps=4", "rollout.weight_sync=none", "train.lr=3e-2",
                               "rewards.0.name=test_server_backend:varied_reward"))
    rows = [r for r in read_metrics(run_dir) if "mismatch/kl" in r]
    assert rows[0]["mismatch/max_abs"] < 1e-4
    assert rows[-1]["mismatch/max_abs"] > 1e-3 and rows[-1]["mismatch/kl"] > 0
    assert server.reloads == []


def test_sync_every_and_policy_versions(tiny_config, fake):
    from postrl.trainer.rl import RLTrainer
    from postrl.run import run_job

    server = fake()
    seen = []

    class Spy(RLTrainer):
        def update(self, batch, step):
            seen.append((step, sorted(set(batch.policy_version.tolist()))))
            return super().update(batch, step)

    run_job(Spy, served(tiny_config, server.url, "train.steps=5", "rollout.sync_every=2"))
    assert seen == [(0, [0]), (1, [0]), (2, [2]), (3, [2]), (4, [4])]
    assert len(server.reloads) == 3  # versions 0, 2 and 4 (eval.after=false: version 5 is never sampled from)


def rewards_of(run_dir):
    return [(r["step"], r["reward_mean"]) for r in read_metrics(run_dir) if "reward_mean" in r]


def test_async_with_max_staleness_0_is_the_synchronous_run(tiny_config, fake):
    from postrl.trainer.rl import train

    server = fake()
    sync_dir, _ = train(served(tiny_config, server.url, "train.steps=4", "run.name=sync"))
    async_dir, _ = train(served(tiny_config, server.url, "train.steps=4", "run.name=async0",
                                "rollout.async_generation=true", "rollout.max_staleness=0"))
    assert rewards_of(sync_dir) == rewards_of(async_dir)
    assert len(rewards_of(sync_dir)) == 4


def _run_recording_versions(cfg):
    """Run ``cfg`` and record, for every update, its step and the policy versions of the batch it trained on."""
    from postrl.run import run_job
    from postrl.trainer.rl import RLTrainer

    used = []

    class Spy(RLTrainer):
        def update(self, batch, step):
            used.append((step, batch.policy_version.tolist()))
            return super().update(batch, step)

    return run_job(Spy, cfg)[0], used


def test_async_max_staleness_1_never_uses_an_older_sample(tiny_config, fake):
    server = fake()
    run_dir, used = _run_recording_versions(served(tiny_config, server.url, "train.steps=6",
                                                   "rollout.async_generation=true", "rollout.max_staleness=1"))
    assert [s for s, _ in used] == list(range(6))
    for step, versions in used:
        assert all(0 <= step - v <= 1 for v in versions), (step, versions)
    assert any(step - v == 1 for step, vs in used for v in vs)  # it did run ahead
    rows = [r for r in read_metrics(run_dir) if "staleness_max" in r]
    assert max(r["staleness_max"] for r in rows) == 1 and rows[-1]["stale_dropped"] == 0


def test_async_drops_and_counts_samples_older_than_max_staleness(tiny_config, fake):
    """sync_every=3 with max_staleness=1: the batch generated ahead is two versions old at times; it is dropped
    (counted), the weights are pushed and the batch generated again."""
    server = fake()
    run_dir, used = _run_recording_versions(served(tiny_config, server.url, "train.steps=6",
                                                   "rollout.async_generation=true", "rollout.max_staleness=1",
                                                   "rollout.sync_every=3"))
    for step, versions in used:
        assert all(0 <= step - v <= 1 for v in versions), (step, versions)
    assert max(r.get("stale_dropped", 0) for r in read_metrics(run_dir)) > 0


def test_async_needs_a_served_backend(tiny_config):
    from postrl.trainer.rl import train

    with pytest.raises(ConfigError, match="needs a served backend"):
        train(tiny_config("rollout.async_generation=true", "rollout.max_staleness=1"))


def test_interrupted_run_stops_its_managed_server(tiny_config):
    """A second Ctrl-C (KeyboardInterrupt inside a step) or a crash: the run's close() stops the managed server."""
    from postrl.run import run_job
    from postrl.trainer.rl import RLTrainer

    procs = []

    class Interrupted(RLTrainer):
        def update(self, batch, step):
            procs.append(self.backend.managed.proc)
            raise KeyboardInterrupt

    cfg = tiny_config("rollout.backend=openai_server", "rollout.server.python=" + sys.executable,
                      "rollout.server.module=fake_openai_server", f"rollout.server.env={{PYTHONPATH: {TESTS}}}",
                      "rollout.max_new_tokens=2")
    with pytest.raises(KeyboardInterrupt):
        run_job(Interrupted, cfg)
    assert procs and procs[0].wait(timeout=30) is not None


def test_server_failure_mid_run_keeps_the_checkpoint_and_resume_works(tiny_config, fake):
    from postrl.run import TrainingError, run_job
    from postrl.trainer.rl import RLTrainer, train

    server = fake()

    class Failing(RLTrainer):
        def update(self, batch, step):
            if step == 1:  # the next rollout's requests all fail
                server.faults = ["500"] * 1000
            return super().update(batch, step)

    cfg = served(tiny_config, server.url, "train.steps=4", "train.save_every=1", "rollout.retries=1")
    with pytest.raises((ServerError, TrainingError), match="HTTP 500"):
        run_job(Failing, cfg)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    server.faults = []
    train(cfg, resume=run_dir)
    assert [r["step"] for r in read_metrics(run_dir) if "reward_mean" in r] == [1, 2, 3, 4]
