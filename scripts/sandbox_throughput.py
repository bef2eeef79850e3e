"""Time the code reward (and so the sandbox) on MBPP's reference solutions; prints one JSON line.

python scripts/sandbox_throughput.py ../shared/data/mbpp/mbpp.jsonl
"""

import json
import sys
import time
from pathlib import Path

import score_trl
from score_trl.rewards import code_execution_reward


def main(path: str):
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    completions = [[{"role": "assistant", "content": f"```python\n{r['code']}\n```"}] for r in rows]
    start = time.monotonic()
    rewards = code_execution_reward(
        completions, test_list=[r["test_list"] for r in rows], test_setup_code=[r["test_setup_code"] for r in rows]
    )
    seconds = round(time.monotonic() - start, 1)
    result = {"module": score_trl.__file__, "programs": len(rows), "passed": sum(rewards), "seconds": seconds}
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
