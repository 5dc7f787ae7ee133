"""Experiment trackers (postrl/run/trackers.py): what each library stores is read back with that library's
own reader and compared with what was logged, step by step."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from postrl.config import ConfigError
from postrl.run.trackers import TRACKERS, build_trackers, check_trackers, mlflow_key, scalars

CONFIG = {"run": {"name": "t", "report_to": ["tensorboard"]}, "train": {"lr": 1e-5, "steps": 4},
          "rollout": {"n": 4, "stop": ["</answer>"]}, "data": {"system_prompt": "x" * 7000, "seed": None}}


def row(step: int, shift: float = 0.0) -> dict:
    """A metrics.jsonl row: numbers, an int, a bool, keys with / and @, and values a tracker must skip."""
    return {"step": step, "reward_mean": 0.1 * step + shift, "reward/task": 1.0 / step, "eval/pass@1": 0.25 * step,
            "reward_errors": step, "policy_frozen": step % 2 == 0, "note": "text", "missing": None, "lens": [1, 2]}


def numbers_of(r: dict) -> dict:
    return {k: (int(v) if isinstance(v, bool) else v) for k, v in r.items()
            if k in ("reward_mean", "reward/task", "eval/pass@1", "reward_errors", "policy_frozen")}


def test_scalars_keeps_every_number_and_skips_the_rest():
    out = scalars({**row(2), "nan": float("nan"), "inf": float("inf")})
    assert set(out) == {"reward_mean", "reward/task", "eval/pass@1", "reward_errors", "policy_frozen", "nan", "inf"}
    assert out["policy_frozen"] == 1 and out["reward_errors"] == 2 and out["reward_mean"] == pytest.approx(0.2)
    assert out["inf"] == float("inf") and out["nan"] != out["nan"]


def test_valid_names_are_the_four_libraries():
    assert list(TRACKERS) == ["tensorboard", "wandb", "mlflow", "trackio"]


# ------------------------------------------------------------------ config errors
def test_unknown_tracker_names_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        check_trackers(["tensorbaord"])
    msg = str(err.value)
    assert "run.report_to" in msg and "'tensorbaord'" in msg and "did you mean tensorboard" in msg
    assert "tensorboard, wandb, mlflow, trackio" in msg


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow", "trackio"])
def test_missing_library_names_the_extra(name, monkeypatch):
    monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    with pytest.raises(ConfigError) as err:
        check_trackers([name])
    assert f"run.report_to: {name} needs the {name} package: pip install 'postrl[{name}]'" in str(err.value)


def test_build_closes_the_started_trackers_when_one_fails(monkeypatch, tmp_path):
    closed = []

    class Good:
        name, package = "good", "json"

        def __init__(self, *args):
            pass

        def close(self):
            closed.append(True)

    class Bad(Good):
        name = "bad"

        def __init__(self, *args):
            raise RuntimeError("cannot start")

    monkeypatch.setitem(TRACKERS, "good", Good)
    monkeypatch.setitem(TRACKERS, "bad", Bad)
    with pytest.raises(RuntimeError, match="cannot start"):
        build_trackers(["good", "bad"], tmp_path, "t", CONFIG)
    assert closed == [True]


def test_no_trackers_by_default(tmp_path):
    assert build_trackers([], tmp_path, "t", CONFIG) == []
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ tensorboard
def _tensorboard_scalars(log_dir: Path) -> tuple[dict, str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    curves = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    text = acc.Tensors("config/text_summary")[-1].tensor_proto.string_val[0].decode()
    return curves, text


def test_tensorboard_values_read_back_and_resume_purges_later_points(tmp_path):
    pytest.importorskip("tensorboard")
    (tb,) = build_trackers(["tensorboard"], tmp_path, "t", CONFIG)
    for step in range(1, 5):
        tb.log(row(step), step)
    tb.close()

    curves, text = _tensorboard_scalars(tmp_path / "tensorboard")
    assert set(curves) == set(numbers_of(row(1)))  # no "step", no string / None / list
    for key in curves:  # TensorBoard stores 32-bit floats
        assert curves[key] == [(s, pytest.approx(numbers_of(row(s))[key], rel=1e-6)) for s in range(1, 5)]
    assert yaml.safe_load(textwrap.dedent(text)) == CONFIG

    # resume from the checkpoint of step 2: steps 3-4 run again, with other values; the stale points go
    (tb,) = build_trackers(["tensorboard"], tmp_path, "t", CONFIG, resume_step=2)
    for step in (3, 4, 5):
        tb.log(row(step, shift=10.0), step)
    tb.close()
    curves, _ = _tensorboard_scalars(tmp_path / "tensorboard")
    assert curves["reward_mean"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)), (3, pytest.approx(10.3)),
                                     (4, pytest.approx(10.4)), (5, pytest.approx(10.5))]


# ------------------------------------------------------------------ wandb (offline)
def _wandb_records(path: Path) -> list:
    """The records of a ``.wandb`` file: W&B's framing (a 7-byte header, then 32 KiB blocks of chunks with a
    7-byte header each: crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) around its protobuf records.
    wandb ships no Python reader for it (its Go core writes and syncs it)."""
    from wandb.proto import wandb_internal_pb2

    data, records, payload = path.read_bytes(), [], b""
    assert data[:4] == b":W&B"
    pos, block = 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def _wandb_flushed() -> None:
    """Offline, ``run.finish()`` can return before W&B's core process has written the ``.wandb`` file out
    (it does so by the time the process exits); ``wandb.teardown()`` waits for it. The tracker does not call
    it: it would also end any other W&B run of the process."""
    import wandb

    wandb.teardown()


def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    home = tmp_path / "wandb-home"  # keep W&B's caches and settings out of the real home directory
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    return tmp_path / "run"


def test_wandb_offline_run_holds_the_logged_values(wandb_offline):
    run_dir = wandb_offline
    run_dir.mkdir()
    (wb,) = build_trackers(["wandb"], run_dir, "my-run", CONFIG)
    for step in range(1, 4):
        wb.log(row(step), step)
    wb.close()
    _wandb_flushed()

    run_id = (run_dir / "wandb_id").read_text().strip()
    (offline,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    records = _wandb_records(offline / f"run-{run_id}.wandb")
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {_item_key(i): json.loads(i.value_json) for i in r.history.item}
            history[r.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    assert history == {s: numbers_of(row(s)) for s in range(1, 4)}
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_id == run_id and run.display_name == "my-run" and run.project == "postrl"
    config = {_item_key(i): json.loads(i.value_json) for i in run.config.update}
    assert config["train"] == CONFIG["train"] and config["rollout"] == CONFIG["rollout"]

    # a resumed run continues the same W&B run
    (wb,) = build_trackers(["wandb"], run_dir, "my-run", CONFIG, resume_step=3)
    wb.log(row(4), 4)
    wb.close()
    _wandb_flushed()
    assert (run_dir / "wandb_id").read_text().strip() == run_id
    # each start has its own offline-run directory (one started in the same second gets a "-1" suffix)
    steps = {r.history.step.num for path in (run_dir / "wandb").glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb")
             for r in _wandb_records(path) if r.WhichOneof("record_type") == "history"}
    assert 4 in steps


# ------------------------------------------------------------------ mlflow
def test_mlflow_key_mapping():
    assert mlflow_key("eval/pass@1") == "eval/pass_at_1"
    assert mlflow_key("reward_status/code:1/ok") == "reward_status/code_1/ok"
    assert mlflow_key("a//b/") == "a/_/b/_" and mlflow_key("x/../y") == "x/_/y"
    assert mlflow_key("reward/task") == "reward/task"


def test_mlflow_values_params_and_resume(monkeypatch, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(var, raising=False)
    (ml,) = build_trackers(["mlflow"], tmp_path, "my-run", CONFIG)
    for step in range(1, 4):
        ml.log(row(step), step)
    ml.close()

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    run_id = (tmp_path / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.run_name == "my-run" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "postrl"
    for key in numbers_of(row(1)):
        history = client.get_metric_history(run_id, mlflow_key(key))
        assert sorted((m.step, m.value) for m in history) == [(s, float(numbers_of(row(s))[key])) for s in (1, 2, 3)]
    assert set(run.data.metrics) == {mlflow_key(k) for k in numbers_of(row(1))}
    params = run.data.params
    assert params["train.lr"] == "1e-05" and params["rollout.stop"] == '["</answer>"]'
    assert params["data.seed"] == "null" and params["data.system_prompt"] == "x" * MAX_PARAM_VAL_LENGTH
    saved = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl")))
    assert yaml.safe_load(saved.read_text()) == CONFIG

    # resume with a changed config: the same run, no error for the changed param, the new step logged
    changed = {**CONFIG, "train": {"lr": 1e-5, "steps": 8}}
    (ml,) = build_trackers(["mlflow"], tmp_path, "my-run", changed, resume_step=3)
    ml.log(row(4), 4)
    ml.close()
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run_id]
    assert [m.step for m in client.get_metric_history(run_id, "reward_mean")] == [1, 2, 3, 4]


# ------------------------------------------------------------------ trackio
TRACKIO_SCRIPT = """
import json, sys
from pathlib import Path
from postrl.run.trackers import build_trackers
from trackio.sqlite_storage import SQLiteStorage
config, rows = json.loads(sys.argv[1]), json.loads(sys.argv[2])
(tr,) = build_trackers(["trackio"], Path(sys.argv[3]), "my-run", config)
for r in rows:
    tr.log(r, r["step"])
tr.close()
print("LOGS=" + json.dumps({"logs": SQLiteStorage.get_logs("postrl", "my-run"),
                            "config": SQLiteStorage.get_run_config("postrl", "my-run")}, default=str))
"""


def test_trackio_values_read_back(tmp_path):
    if importlib.util.find_spec("trackio") is None:
        pytest.skip("trackio is not installed")
    # Trackio fixes its data directory (TRACKIO_DIR) when it is imported: a fresh process writes under tmp_path
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}
    for var in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_PROJECT"):
        env.pop(var, None)
    rows = [row(s) for s in range(1, 4)]
    out = subprocess.run([sys.executable, "-c", TRACKIO_SCRIPT, json.dumps(CONFIG), json.dumps(rows), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("LOGS=")]
    got = json.loads(line[len("LOGS="):])
    logs = {log["step"]: {k: v for k, v in log.items() if k not in ("step", "timestamp")} for log in got["logs"]}
    assert logs == {s: numbers_of(row(s)) for s in range(1, 4)}
    assert {k: got["config"][k] for k in CONFIG} == CONFIG


# ------------------------------------------------------------------ through a training run
def test_training_run_logs_every_metric_to_tensorboard(tiny_config):
    """`postrl train` with run.report_to=[tensorboard]: every number of every metrics.jsonl row is in the event
    file (read with TensorBoard's own reader) at its step, and the config is there as text."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from postrl.trainer.rl import train

    run_dir, _ = train(tiny_config("train.steps=3", "run.threads=1", "run.report_to=[tensorboard]"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for r in rows:
        for key, value in scalars(r).items():
            assert key in tags, key
            logged = {e.step: e.value for e in acc.Scalars(key)}
            assert logged[r["step"]] == pytest.approx(value, rel=1e-6, abs=1e-6), (key, r["step"])
    assert {k for r in rows for k in scalars(r)} == tags  # nothing else, nothing missing
    assert "config" in "".join(acc.Tags().get("tensors", []))
