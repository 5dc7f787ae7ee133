"""``postrl report``: the HTML report of a real tiny run, its plots, its sample log, and Chromium rendering.

One tiny training run (4 steps of the tiny random Llama on the copy task, with held-out evaluation before,
during and after) is shared by the tests of this module; each test that changes a run works on a copy.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from postrl.cli import main
from postrl.config import load_config, save_config
from postrl.eval import plots as P
from postrl.eval.report import (
    MAX_COMPLETION_CHARS,
    ReportError,
    build_report,
    clip_text,
    parse_eval,
    pick_evenly,
    read_jsonl,
    sample_log_record,
    should_log_samples,
)
from postrl.rollout.batch import RolloutBatch
from postrl.rollout.generator import Generation
from postrl.trainer import train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = 4
# every panel the tiny GRPO run must produce (it logs all of these metrics)
EXPECTED_PLOTS = [s.name for s in P.PLOTS] + [P.HELD_OUT_NAME]


# ------------------------------------------------------------------------------------------------
# the shared run
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, copy_task, tmp_path_factory) -> Path:
    """A real run directory: the tiny_config settings (conftest.py) with evaluation on, 4 steps."""
    out = tmp_path_factory.mktemp("report_runs")
    cfg = load_config(None, [
        f"model.name_or_path={tiny_model_dir}", "data.source=jsonl", f"data.path={copy_task}", "data.eval_size=8",
        "data.answer_extraction=raw", "rollout.n=4", "rollout.max_new_tokens=2", "train.prompts_per_step=4",
        "train.micro_batch_size=8", f"train.steps={STEPS}", "train.lr=1e-3", "eval.before=true", "eval.after=true",
        "eval.every=2", f"run.output_dir={out}", "run.name=r", "run.progress=false", "run.threads=1",
    ])
    rd, results = train(cfg)
    assert results["steps"] == STEPS
    return rd


@pytest.fixture(scope="module")
def report(run_dir) -> Path:
    return build_report(run_dir)


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("checkpoints", "plots", "report.html"))
    return dest


# ------------------------------------------------------------------------------------------------
# HTML checks
# ------------------------------------------------------------------------------------------------
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _Checker(HTMLParser):
    """Balanced tags, element counts, and every <img>'s attributes."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.counts: dict[str, int] = {}
        self.imgs: list[dict[str, str]] = []
        self.doctype = None
        self.urls: list[str] = []

    def handle_decl(self, decl):
        self.doctype = decl

    def handle_starttag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v is not None]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1
        if tag == "img":
            self.imgs.append(dict(attrs))
        if tag not in VOID:
            self.errors.append(f"self-closing non-void <{tag}/>")

    def handle_endtag(self, tag):
        if tag in VOID:
            self.errors.append(f"end tag for void element </{tag}>")
        elif not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else 'nothing'}>")
        else:
            self.stack.pop()


def check_html(text: str) -> _Checker:
    c = _Checker()
    c.feed(text)
    c.close()
    assert not c.errors, c.errors[:5]
    assert not c.stack, f"unclosed tags: {c.stack}"
    assert c.doctype and c.doctype.lower() == "doctype html"
    for tag in ("html", "head", "body", "title"):
        assert c.counts.get(tag) == 1, (tag, c.counts.get(tag))
    return c


def decode_png(src: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    data = base64.b64decode(src[len(prefix):], validate=True)
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    return data


def png_pixels(data: bytes) -> np.ndarray:
    import io

    import matplotlib.image as mpimg

    return mpimg.imread(io.BytesIO(data), format="png")


# ------------------------------------------------------------------------------------------------
# pure helpers, worked out by hand
# ------------------------------------------------------------------------------------------------
def test_should_log_samples_cadence():
    # 100 steps, target 20 -> every 5th step, plus step 1: 1, 5, 10, ..., 100
    logged = [s for s in range(1, 101) if should_log_samples(s, 100)]
    assert logged == [1] + list(range(5, 101, 5))
    # short runs log every step; 45 steps -> every 2nd, plus the first and the last (45)
    assert [s for s in range(1, 8) if should_log_samples(s, 7)] == list(range(1, 8))
    assert [s for s in range(1, 46) if should_log_samples(s, 45)] == [1] + list(range(2, 45, 2)) + [45]
    with pytest.raises(ValueError, match="must be >= 1"):
        should_log_samples(0, 10)


def scored_batch(samples, texts, rewards, components, correct, group_size) -> RolloutBatch:
    """A rollout batch of one-token completions with the given texts and scores."""
    B = len(samples)
    ones = torch.ones(B, 1, dtype=torch.long)
    gen = Generation([[1]] * B, ones, ones.clone(), torch.zeros(B, 1), torch.zeros(B, dtype=torch.bool), 1,
                     torch.zeros(B, 1))
    batch = RolloutBatch.from_generation(gen, samples, ["prompt"] * B, texts, group_size, policy_version=0)
    batch.rewards, batch.components, batch.correct = torch.tensor(rewards, dtype=torch.float64), components, correct
    batch.validate()
    return batch


def test_sample_log_record_best_worst_and_truncation():
    s = [SimpleNamespace(question=f"q{g}", answer=str(g)) for g in range(3) for _ in range(3)]
    long = "x" * (MAX_COMPLETION_CHARS + 25)
    batch = scored_batch(
        s, ["a", "b", long, "d", "e", "f", "g", "h", "i"],
        [0.5, 1.0, 1.0, 0.0, 0.0, 0.0, float("nan"), 2.0, 3.0],
        {"task": [0, 1, 1, 0, 0, 0, 0, 1, 1], "fmt": [0.5, 0, 0, 0, 0, 0, 0, 1, 2]},
        [False, True, True, False, False, False, False, True, True], group_size=3)
    rec = sample_log_record(7, batch, group_size=3)
    assert rec["step"] == 7 and len(rec["groups"]) == 2  # SAMPLE_LOG_GROUPS = 2 of the 3 groups
    g0, g1 = rec["groups"]
    assert g0["prompt"] == "q0" and g0["answer"] == "0" and g0["rewards"] == [0.5, 1.0, 1.0]
    # best: first of the highest (row 1, not row 2); worst: the lowest (row 0)
    assert g0["best"] == {"index": 1, "reward": 1.0, "text": "b", "components": {"task": 1.0, "fmt": 0.0},
                          "correct": True}
    assert g0["worst"]["index"] == 0 and g0["worst"]["components"] == {"task": 0.0, "fmt": 0.5}
    # all equal: best is the first row, worst the last, so two different completions are shown
    assert (g1["best"]["index"], g1["worst"]["index"]) == (0, 2)
    # a NaN reward is stored as null (JSON has no NaN) and counts as the worst
    g2 = sample_log_record(1, batch, 3, max_groups=3)["groups"][2]
    assert g2["rewards"] == [None, 2.0, 3.0] and g2["worst"]["index"] == 0 and g2["best"]["index"] == 2
    json.dumps(rec, allow_nan=False)
    # truncation is marked
    batch.rewards[2] = 5.0
    best = sample_log_record(1, batch, 3)["groups"][0]["best"]
    assert best["text"] == "x" * MAX_COMPLETION_CHARS + " [... 25 more characters]"
    with pytest.raises(ValueError, match="not a multiple of group_size 4"):
        sample_log_record(1, batch, 4)


def test_clip_text_and_pick_evenly():
    assert clip_text("abcdef", 6) == "abcdef"
    assert clip_text("abcdef", 4) == "abcd [... 2 more characters]"
    with pytest.raises(ValueError, match="limit must be >= 1"):
        clip_text("a", 0)
    # 10 items, 4 picks: positions round(i * 9 / 3) = 0, 3, 6, 9
    assert pick_evenly(list(range(1, 11)), 4) == [1, 4, 7, 10]
    assert pick_evenly([1, 2, 3], 4) == [1, 2, 3]
    assert pick_evenly([1, 2, 3], 1) == [1]
    with pytest.raises(ValueError, match="k must be >= 1"):
        pick_evenly([1], 0)


@pytest.mark.parametrize("data", [
    {"models": [{"name": "base", "pass_at_k": {"1": 0.2, "4": {"value": 0.5, "ci": [0.4, 0.6]}},
                 "greedy_accuracy": 0.25, "diversity": {"distinct_1": 0.7}}]},
    {"models": {"base": {"pass_at_k": [{"k": 1, "value": 0.2}, {"k": 4, "mean": 0.5, "ci_low": 0.4, "ci_high": 0.6}],
                         "greedy_accuracy": 0.25, "diversity": {"distinct_1": 0.7}}}},
    [{"model": "base", "pass@1": 0.2, "pass@4": 0.5, "pass_at_k_ci": {"4": [0.4, 0.6]},
      "greedy_accuracy": 0.25, "diversity": {"distinct_1": 0.7}}],
])
def test_parse_eval_shapes(data):
    (m,) = parse_eval(data)
    assert m.name == "base"
    assert m.pass_at_k == {1: (0.2, None, None), 4: (0.5, 0.4, 0.6)}
    assert m.scalars == {"greedy_accuracy": 0.25, "diversity.distinct_1": 0.7}


def test_parse_eval_maj_and_two_models():
    models = parse_eval({"models": [{"name": "a", "pass_at_k": {"1": 0.1}, "maj_at_k": {"k=8": [0.3, 0.2, 0.4]}},
                                    {"name": "b", "pass_at_k": {"1": 0.3}}]})
    assert [m.name for m in models] == ["a", "b"]
    assert models[0].maj_at_k == {8: (0.3, 0.2, 0.4)} and models[1].maj_at_k == {}
    assert parse_eval({"nothing": "here"}) == []


# ------------------------------------------------------------------------------------------------
# the run directory the trainer writes
# ------------------------------------------------------------------------------------------------
def test_trainer_records_environment_and_samples(run_dir):
    env = json.loads((run_dir / "env.json").read_text())
    import torch

    assert env["torch"] == torch.__version__ and env["postrl"] and env["transformers"]
    assert env["device"] == "cpu" and env["threads"] == 1 and env["seed"] == 0 and env["start_step"] == 0
    rows = read_jsonl(run_dir / "samples.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # short run: every step
    texts = run_dir.joinpath("samples.jsonl").read_text().splitlines()
    assert all(len(t) < 4000 for t in texts)  # a few KB per logged step at most
    for r in rows:
        assert len(r["groups"]) == 2
        for g in r["groups"]:
            assert g["prompt"].startswith("copy ") and len(g["rewards"]) == 4
            assert g["best"]["reward"] == max(g["rewards"]) and g["worst"]["reward"] == min(g["rewards"])
            assert set(g["best"]["components"]) == {"task"}


def test_resume_keeps_environment_history_and_trims_samples(run_dir, tmp_path):
    rd = tmp_path / "r"
    shutil.copytree(run_dir, rd)
    # pretend a step 5 was logged after the last checkpoint (step 4): resume must drop it and redo it
    with open(rd / "samples.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "groups": []}) + "\n")
    cfg = load_config(rd / "config.yaml", [f"train.steps={STEPS + 1}", "eval.after=false"])
    train(cfg, resume=rd)
    env = json.loads((rd / "env.json").read_text())
    assert env["start_step"] == STEPS and [p["start_step"] for p in env["previous_sessions"]] == [0]
    rows = read_jsonl(rd / "samples.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 2)) and rows[-1]["groups"]


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------
def test_report_is_valid_self_contained_html(report):
    text = report.read_text(encoding="utf-8")
    c = check_html(text)
    assert "<script" not in text.lower() and "<link" not in text.lower()
    # no external resources: only data: images and in-page anchors
    assert all(u.startswith(("data:image/png;base64,", "#")) for u in c.urls), [u[:40] for u in c.urls]
    assert c.imgs, "no images"
    for img in c.imgs:
        data = decode_png(img["src"])
        px = png_pixels(data)
        assert px.shape[:2] == (300, 480) and float(px[..., :3].std()) > 0.05  # not a blank image
        assert img.get("alt")
    for heading in ("Training curves", "Evaluation", "Sample completions", "Environment", "Configuration"):
        assert f">{heading}</h2>" in text
    import torch

    assert f"<td>torch</td><td>{torch.__version__}</td>" in text  # the environment table
    assert len(text) < 1_000_000  # small figures keep the page small


def test_every_expected_plot_is_present(report, run_dir):
    text = report.read_text(encoding="utf-8")
    c = check_html(text)
    alts = [img["alt"] for img in c.imgs]
    titles = {s.name: s.title for s in P.PLOTS} | {P.HELD_OUT_NAME: "Held-out evaluation"}
    for name in EXPECTED_PLOTS:
        assert titles[name] in alts, f"plot {name} missing from the report"
        png = (run_dir / "plots" / f"{name}.png").read_bytes()
        assert png.startswith(PNG_SIGNATURE) and png_pixels(png).shape[:2] == (300, 480)
    assert "not plotted" not in text  # this run logs every metric
    # the embedded image is the PNG copy
    reward_img = next(img for img in c.imgs if img["alt"] == titles["reward"])
    assert decode_png(reward_img["src"]) == (run_dir / "plots" / "reward.png").read_bytes()
    # sample completions: early and late steps, best and worst with their rewards
    assert all(f">Step {s}</h3>" in text for s in range(1, STEPS + 1))
    assert text.count("<b>best</b>") == text.count("<b>worst</b>") == 2 * STEPS
    # before/after table and the config
    assert "Before and after training" in text and "held-out accuracy (greedy)" in text
    assert "algo.advantage" in text and "full config.yaml" in text


def test_report_escapes_model_text(run_dir, tmp_path):
    rd = copy_run(run_dir, tmp_path / "r")
    evil = "<script>alert('x')</script><img src=http://e.invalid/a.png>"
    rec = {"step": 1, "groups": [{"prompt": evil, "answer": "&", "rewards": [1.0, 0.0],
                                  "best": {"index": 0, "reward": 1.0, "text": evil, "components": {"task": 1.0}},
                                  "worst": {"index": 1, "reward": 0.0, "text": "", "components": {}}}]}
    (rd / "samples.jsonl").write_text(json.dumps(rec) + "\n")
    text = build_report(rd).read_text()
    check_html(text)
    assert "<script>" not in text and "http://e.invalid" not in re.findall(r'src="([^"]*)"', text)
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "(empty completion)" in text


def test_absent_metrics_are_skipped_with_a_note(run_dir, tmp_path):
    rd = copy_run(run_dir, tmp_path / "r")
    rows = read_jsonl(rd / "metrics.jsonl")
    for r in rows:
        r.pop("clip_frac")
        for key in [k for k in r if k.startswith("eval/")]:  # periodic evals logged with the metrics
            r.pop(key)
        r["grad_norm"] = float("nan")  # e.g. PPO critic warm-up: no policy update, NaN norm
    (rd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = json.loads((rd / "results.json").read_text())
    for key in ("eval_before", "eval_after", "eval_during"):
        results.pop(key)
    (rd / "results.json").write_text(json.dumps(results))
    (rd / "plots").mkdir()
    (rd / "plots" / "grad_norm.png").write_bytes(b"stale")  # from an earlier report: removed
    text = build_report(rd).read_text()
    alts = [img["alt"] for img in check_html(text).imgs]
    assert "Clip fraction" not in alts and "Gradient norm (before clipping)" not in alts
    assert "Held-out evaluation" not in alts and "Reward (total and per component)" in alts
    assert "Clip fraction: not plotted, this run logged no finite values for clip_frac." in text
    assert "Gradient norm (before clipping): not plotted" in text and "Held-out evaluation: not plotted" in text
    assert not (rd / "plots" / "grad_norm.png").exists() and not (rd / "plots" / "clip_fraction.png").exists()
    assert "No before/after evaluation" in text


def test_zero_variance_and_sampler_panels(run_dir, tmp_path):
    """Every run plots its zero-variance accounting; a run with a prompt sampler also plots what the sampler
    skipped and its per-task shares (issue 16), a run without one has no sampler panel and no note about it."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert all("zero_var/group_frac" in r and "zero_var/sampled_group_frac" in r for r in rows)
    zero = next(s for s in P.PLOTS if s.name == "zero_variance")
    assert {x.label for x in P.spec_series(zero, rows)} >= {"of trained groups", "of sampled groups"}
    plain = build_report(copy_run(run_dir, tmp_path / "plain")).read_text()
    sampler_titles = [s.title for s in P.SAMPLER_PLOTS]
    assert not any(t in plain for t in sampler_titles)
    rd = copy_run(run_dir, tmp_path / "r")
    for i, r in enumerate(rows):  # what a DUMP run over two tasks logs (docs/curricula.md)
        r.update({"sampler/skipped": float(i), "sampler/prob/add1": 0.5 - 0.1 * i, "sampler/prob/add2": 0.5 + 0.1 * i,
                  "zero_var/task/add1": 1.0, "zero_var/task/add2": 0.25})
    (rd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = build_report(rd).read_text()
    alts = [img["alt"] for img in check_html(text).imgs]
    assert "Sampler: prompts skipped and rollouts spent" in alts and "Sampler: share of prompts per task" in alts
    assert "Sampler: curriculum level per task" not in alts and "curriculum level" not in text  # no rg_curriculum
    tasks = next(s for s in P.SAMPLER_PLOTS if s.name == "sampler_tasks")
    series = {x.label: x.ys for x in P.spec_series(tasks, rows)}
    assert series["sampler/prob/add2"] == pytest.approx([0.5, 0.6, 0.7, 0.8])
    assert {x.label for x in P.spec_series(zero, rows)} >= {"zero_var/task/add1", "zero_var/task/add2"}
    for name in ("sampler", "sampler_tasks", "zero_variance"):
        assert (rd / "plots" / f"{name}.png").read_bytes().startswith(PNG_SIGNATURE)


def test_cli_report_with_pass_at_k(run_dir, tmp_path, capsys):
    rd = copy_run(run_dir, tmp_path / "r")
    ev = {"models": [{"name": "base", "pass_at_k": {str(k): {"value": v, "ci": [v - 0.05, v + 0.05]}
                                                     for k, v in ((1, 0.2), (4, 0.45), (16, 0.7))},
                      "maj_at_k": {"4": 0.3}, "greedy_accuracy": 0.25},
                     {"name": "trained <rl>", "pass_at_k": {"1": 0.4, "4": 0.55, "16": 0.65}}]}
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "eval.json").write_text(json.dumps(ev))
    assert main(["report", str(rd), "--eval", str(tmp_path / "ev")]) == 0
    assert capsys.readouterr().out.strip() == f"report: {rd / 'report.html'}"
    text = (rd / "report.html").read_text()
    c = check_html(text)
    assert "pass@k versus k" in [img["alt"] for img in c.imgs]
    png = (rd / "plots" / "pass_at_k.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and png_pixels(png).shape[:2] == (300, 480)
    assert "0.2 [0.15, 0.25]" in text and "trained &lt;rl&gt;" in text and "k=16" in text
    assert "<h4>maj@k</h4>" in text and "greedy_accuracy" in text
    # without --eval: RUN_DIR/eval.json is picked up; --out writes elsewhere
    shutil.copy(tmp_path / "ev" / "eval.json", rd / "eval.json")
    assert main(["report", str(rd), "--out", str(tmp_path / "other.html")]) == 0
    assert "pass@k versus k" in (tmp_path / "other.html").read_text()


def test_cli_report_bad_input(tmp_path, run_dir, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "not a postrl run directory" in capsys.readouterr().err
    rd = copy_run(run_dir, tmp_path / "r")
    lines = (rd / "metrics.jsonl").read_text().splitlines()
    lines[1] = "{not json"
    (rd / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ReportError, match=r"metrics.jsonl:2: not valid JSON"):
        build_report(rd)
    assert main(["report", str(run_dir), "--eval", str(tmp_path / "nope.json")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_train_command_writes_the_report(tiny_config, tmp_path, capsys, monkeypatch):
    cfg = tiny_config("train.steps=2")
    save_config(cfg, tmp_path / "c.yaml")
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    out = capsys.readouterr().out.splitlines()
    rd = Path(cfg.run.output_dir) / "t"
    assert out[-2] == f"report: {rd / 'report.html'}" and out[-1] == f"run directory: {rd}"
    check_html((rd / "report.html").read_text())

    # a report failure warns; the training command still succeeds
    import postrl.eval.report as report_mod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report_mod, "build_report", boom)
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    captured = capsys.readouterr()
    assert "warning: could not write the report (RuntimeError: disk full)" in captured.err
    assert captured.out.splitlines()[-1].startswith("run directory: ")


# ------------------------------------------------------------------------------------------------
# a real browser
# ------------------------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars"]
# test-only probe: after load, write each image's state into the DOM so that --dump-dom shows it
PROBE = ("<script>window.addEventListener('load',function(){var v=[];for(var i=0;i<document.images.length;i++){"
         "var m=document.images[i];v.push(m.complete+':'+m.naturalWidth+'x'+m.naturalHeight+':'"
         "+Math.round(m.getBoundingClientRect().width));}document.body.setAttribute('data-probe',v.join(' '));});"
         "</script>")


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium "
                                             "chromium-driver; .ci/run installs it)")
def test_chromium_renders_the_plots(report, tmp_path):
    n_imgs = len(check_html(report.read_text()).imgs)
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    res = _chromium(["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], tmp_path)
    m = re.search(r'data-probe="([^"]*)"', res.stdout)
    assert m, f"no probe in the DOM dump (rc {res.returncode}): {res.stderr[-2000:]}"
    states = m.group(1).split()
    assert len(states) == n_imgs
    for s in states:
        complete, size, shown = s.split(":")
        assert complete == "true" and size == "480x300" and int(shown) > 0, s

    shot = tmp_path / "shot.png"
    res = _chromium([f"--screenshot={shot}", "--window-size=1200,2400", report.as_uri()], tmp_path)
    assert shot.is_file(), f"no screenshot (rc {res.returncode}): {res.stderr[-2000:]}"
    px = png_pixels(shot.read_bytes())[..., :3]
    non_white = float((px.min(axis=-1) < 0.9).mean())
    # plot lines are coloured (matplotlib's tab10); text and borders are grey
    coloured = int(((px.max(axis=-1) - px.min(axis=-1)) > 0.3).sum())
    assert non_white > 0.02, f"screenshot almost blank ({non_white:.3%} non-white pixels)"
    assert coloured > 2000, f"only {coloured} coloured pixels: the plots did not render"


# ------------------------------------------------------------------------------------------------
# runs with an environment: whole transcripts, sampled versus loss-masked spans, tool-call statistics
# ------------------------------------------------------------------------------------------------
class _SpanCollector(HTMLParser):
    """The text inside every element with one of ``classes`` (``class -> [text, ...]``)."""

    def __init__(self, classes: tuple[str, ...]):
        super().__init__(convert_charrefs=True)
        self.classes, self.found = classes, {c: [] for c in classes}
        self.stack: list[str | None] = []

    def handle_starttag(self, tag, attrs):
        if tag in VOID:
            return
        cls = (dict(attrs).get("class") or "").split()
        self.stack.append(next((c for c in self.classes if c in cls), None))
        if self.stack[-1] is not None:
            self.found[self.stack[-1]].append("")

    def handle_endtag(self, tag):
        if tag not in VOID and self.stack:
            self.stack.pop()

    def handle_data(self, data):
        for c in self.stack:
            if c is not None:
                self.found[c][-1] += data


@pytest.fixture(scope="module")
def env_run_dir(tiny_model_dir, copy_task, tmp_path_factory) -> Path:
    """A tiny run on the maze with the calculator tool: 3 steps, held-out episodes before and after."""
    out = tmp_path_factory.mktemp("env_report_runs")
    cfg = load_config(None, [
        f"model.name_or_path={tiny_model_dir}", "data.source=jsonl", f"data.path={copy_task}", "data.eval_size=4",
        "env={name: maze, size: 3, max_turns: 3, tools: [calculator], shaping: 0.1}", "env.max_episode_tokens=200",
        "rollout.n=4", "rollout.max_new_tokens=3", "train.prompts_per_step=2", "train.micro_batch_size=8",
        "train.steps=3", "algo.advantage=gigpo", "eval.before=true", "eval.after=true", f"run.output_dir={out}",
        "run.name=env", "run.progress=false", "run.threads=1",
    ])
    rd, results = train(cfg)
    assert results["steps"] == 3
    return rd


def test_env_run_samples_hold_whole_transcripts(env_run_dir):
    rows = read_jsonl(env_run_dir / "samples.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for g in r["groups"]:
            assert g["prompt"].startswith("You can call tools") and "Reach the goal G" in g["prompt"]
            st = g["episodes"]
            assert 0 <= st["success_rate"] <= 1 and 1 <= st["turns_mean"] <= 3 and 0 <= st["tool_call_frac"] <= 1
            for kind in ("best", "worst"):
                e = g[kind]["episode"]
                assert g[kind]["reward"] == e["return"]
                policy = [t for t in e["transcript"] if t["role"] == "policy"]
                assert [t["turn"] for t in policy] == list(range(e["turns"]))
                assert [t["reward"] for t in policy] == e["turn_rewards"]
                spans = e["spans"]
                assert spans[0]["kind"] == "prompt" and spans[0]["text"].startswith("<|system|>")
                assert [s["turn"] for s in spans if s["kind"] == "sampled"] == list(range(e["turns"]))
                assert sum(s["tokens"] for s in spans if s["kind"] == "sampled") == e["sampled_tokens"]
                assert sum(s["tokens"] for s in spans if s["kind"] == "env") == e["env_tokens"]
            assert g["best"]["reward"] == max(g["rewards"]) and g["worst"]["reward"] == min(g["rewards"])


def test_env_report_shows_transcripts_spans_and_tool_statistics(env_run_dir):
    text = build_report(env_run_dir).read_text(encoding="utf-8")
    c = check_html(text)
    assert "<script" not in text.lower()
    for heading in ("Episodes and tool calls", "Sample episodes"):
        assert f">{heading}</h2>" in text
    alts = [img["alt"] for img in c.imgs]
    assert "Episodes: success, tool use, truncation" in alts and "Episodes: turns and tool calls" in alts
    assert (env_run_dir / "plots" / "episodes.png").read_bytes().startswith(PNG_SIGNATURE)
    # tool-call statistics: the episodes table and each group's line
    assert "tool calls per episode" in text and "episodes with a tool call" in text and "tool errors" in text
    assert "held-out success rate (greedy episodes)" in text
    # the transcripts: every logged best/worst episode, its turns with their roles and per-turn rewards
    rows = read_jsonl(env_run_dir / "samples.jsonl")
    shown = [e for r in rows for g in r["groups"] for e in (g["best"]["episode"], g["worst"]["episode"])]
    assert text.count('class="best episode"') == text.count('class="worst episode"') == len(shown) // 2
    coll = _SpanCollector(("t-policy", "t-environment", "t-system", "tok-sampled", "tok-masked"))
    coll.feed(text)
    policy_turns = sum(e["turns"] for e in shown)
    legend = 1  # the legend shows one chip / span of each kind
    assert len(coll.found["t-policy"]) == policy_turns + legend
    assert len(coll.found["tok-sampled"]) == policy_turns + legend
    env_spans = sum(1 for e in shown for s in e["spans"] if s["kind"] != "sampled")
    assert len(coll.found["tok-masked"]) == env_spans + legend
    assert len(coll.found["t-system"]) == len(shown)  # the tool description, once per episode
    # sampled and loss-masked tokens are styled apart, and the span texts are the logged ones, in order
    css = re.search(r"<style>(.*)</style>", text, re.DOTALL).group(1)
    sampled_css = re.search(r"\.tok-sampled\{([^}]*)\}", css).group(1)
    masked_css = re.search(r"\.tok-masked\{([^}]*)\}", css).group(1)
    assert "background" in sampled_css and "background" in masked_css and sampled_css != masked_css
    logged = [s["text"] for e in shown for s in e["spans"] if s["kind"] == "sampled"]
    assert coll.found["tok-sampled"][legend:] == logged
    rewards = [f"reward {r:+.3g}" for e in shown for r in e["turn_rewards"]]
    assert all(r in text for r in rewards)


def test_env_report_escapes_transcripts_and_shows_tool_turns(env_run_dir, tmp_path):
    rd = copy_run(env_run_dir, tmp_path / "r")
    evil = "<script>alert(1)</script>"
    episode = {"success": True, "return": 1.0, "turns": 2, "end": "done", "truncated": False, "turn_rewards": [0, 1.0],
               "tool_calls": 1, "tool_errors": 0, "invalid_actions": 0, "env_errors": 0, "sampled_tokens": 5,
               "env_tokens": 3,
               "transcript": [{"role": "environment", "text": evil},
                              {"role": "policy", "turn": 0, "reward": 0.0, "tool_calls": 1,
                               "text": '<tool_call>{"name": "calculator"}</tool_call>'},
                              {"role": "tool", "name": "calculator", "text": "56088"},
                              {"role": "policy", "turn": 1, "reward": 1.0, "tool_calls": 0, "text": "56088"}],
               "spans": [{"kind": "prompt", "text": evil}, {"kind": "sampled", "text": "<tool_call>", "tokens": 4,
                                                             "turn": 0},
                         {"kind": "env", "text": "56088", "tokens": 3},
                         {"kind": "sampled", "text": "x", "tokens": 1, "turn": 1}]}
    group = {"prompt": evil, "answer": "", "rewards": [1.0, 0.0], "sample": "s",
             "episodes": {"success_rate": 0.5, "turns_mean": 2.0, "tool_calls_mean": 0.5, "tool_call_frac": 0.5,
                          "tool_errors": 0, "invalid_actions_mean": 0.0},
             "best": {"index": 0, "reward": 1.0, "text": "56088", "components": {}, "correct": True, "episode": episode},
             "worst": {"index": 1, "reward": 0.0, "text": "", "components": {}, "correct": False,
                       "episode": {**episode, "transcript": [], "spans": [], "turn_rewards": []}}}
    (rd / "samples.jsonl").write_text(json.dumps({"step": 1, "groups": [group]}) + "\n")
    text = build_report(rd).read_text()
    check_html(text)
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert '<div class="turn t-tool"><span class="role">tool calculator</span>' in text
    assert "1 tool call(s)" in text and "tool calls 0.5 per episode (in 50% of them)" in text
    assert "&lt;tool_call&gt;" in text
    assert "5 sampled, 3 loss-masked after the prompt" in text
