"""Tool-call demonstrations for a supervised warm-up before agent RL (``recipes/agent_calculator.yaml``).

``python -m postrl.data.tool_demos --out runs/agent_calculator_sft.jsonl`` writes conversational SFT records
(``{"messages": [...]}``, the format ``postrl sft`` reads) of the ``arithmetic`` environment with the
``calculator`` tool, played by a script::

    system     the tools' description, exactly as the episode runner writes it for a chat template that does not
               render tools (postrl.envs.tools.format_tool_prompt), after the recipe's system prompt if any
    user       the environment's question, e.g. "What is 482 * 7315? Give the final answer as a number."
    assistant  <tool_call>{"name": "calculator", "arguments": {"expression": "482 * 7315"}}</tool_call>
    tool       3525830                                   (the calculator's answer, computed by the tool itself)
    assistant  3525830

Every record is checked by playing it in the environment (the script's episode must earn reward 1), so the
demonstrations are what a successful episode looks like to the trainer, message for message. The questions
come from environment seeds far from the ones training and evaluation use (``DEMO_SEED_BASE``).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Optional, Sequence

DEMO_SEED_BASE = 3_000_000_000  # environment seeds of demonstrations; training and evaluation seeds are < 2^31
_QUESTION = re.compile(r"What is (-?\d+) ([*+-]) (-?\d+)\?")


def calculator_demos(size: int, seed: int = 0, op: str = "*", digits: Sequence[int] = (3, 4),
                     system_prompt: Optional[str] = None) -> list[dict[str, Any]]:
    """``size`` conversational records of the arithmetic environment solved with one calculator call."""
    from postrl.envs import ToolEnv, build_env, build_tools
    from postrl.envs.tools import format_tool_prompt

    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    tools = build_tools(["calculator"])
    system = ((system_prompt + "\n\n") if system_prompt else "") + format_tool_prompt(tools)
    out = []
    for i in range(size):
        env = ToolEnv(build_env("arithmetic", {"op": op, "digits": tuple(digits)}), tools)
        obs, _ = env.reset(seed=DEMO_SEED_BASE + seed * 100_003 + i)
        question = obs[-1]["content"]
        m = _QUESTION.search(question)
        if m is None:  # pragma: no cover - the environment's own format
            raise ValueError(f"unexpected question {question!r}")
        call = json.dumps({"name": "calculator", "arguments": {"expression": f"{m.group(1)} {m.group(2)} {m.group(3)}"}})
        action = f"<tool_call>{call}</tool_call>"
        tool_obs, _, done, info = env.step(action)
        if done or info.get("tool_calls") != 1 or info.get("tool_errors"):
            raise ValueError(f"the calculator did not answer {action!r}: {tool_obs}")
        result = tool_obs[0]["content"]
        _, reward, done, _ = env.step(result)
        if not (done and reward == 1.0):  # pragma: no cover - the demonstration must solve its episode
            raise ValueError(f"demonstration {i} does not solve {question!r} (answer {result!r})")
        out.append({"messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
            {"role": "assistant", "content": action},
            {"role": "tool", "content": result, "name": "calculator"},
            {"role": "assistant", "content": result},
        ]})
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m postrl.data.tool_demos", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSONL file to write (its directory is created)")
    p.add_argument("--size", type=int, default=400, help="records (default 400)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--op", default="*", choices=("*", "+", "-"))
    p.add_argument("--digits", default="3,4", help="min,max digits of the operands (default 3,4)")
    p.add_argument("--system-prompt", default=None, help="the recipe's data.system_prompt, if it has one")
    args = p.parse_args(argv)
    lo, hi = (int(x) for x in args.digits.split(","))
    records = calculator_demos(args.size, args.seed, args.op, (lo, hi), args.system_prompt)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(out)
    print(f"{len(records)} demonstrations: {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
