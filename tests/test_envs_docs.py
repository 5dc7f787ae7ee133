"""The runnable example of docs/agents.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "agents.md"


def test_agents_doc_example_runs(tmp_path, monkeypatch, capsys):
    text = DOC.read_text(encoding="utf-8")
    block = re.search(r"<!-- example:start -->\s*```python\n(.*?)```\s*<!-- example:end -->", text, re.DOTALL)
    assert block, "docs/agents.md lost its runnable example"
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)  # a tiny model decodes faster on one thread (conftest restores the count)
    namespace: dict = {"__name__": "agents_doc_example"}
    from postrl.envs import ENVS

    ENVS.pop("countdown_example", None)  # the example registers it
    try:
        exec(compile(block.group(1), str(DOC), "exec"), namespace)
    finally:
        ENVS.pop("countdown_example", None)
    batch = namespace["batch"]
    assert len(batch) == 16 and batch.group_size == 4
    assert all(e.end in ("done", "max_turns", "token_budget") for e in batch.episodes)
    assert "episodes/success_rate" in capsys.readouterr().out
