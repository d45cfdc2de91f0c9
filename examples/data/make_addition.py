"""Write addition.jsonl: two-digit additions as a user's own JSON Lines data set.

    python examples/data/make_addition.py   # rewrites examples/data/addition.jsonl

It stands in for a user's file in examples/jsonl.yaml: one object per line with the
fields the `jsonl` task reads (`prompt`, `answer`).
"""

import json
import random
from pathlib import Path

rng = random.Random(0)
rows = []
for _ in range(2000):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
path = Path(__file__).with_name("addition.jsonl")
path.write_text("".join(json.dumps(row) + "\n" for row in rows))
print(f"wrote {len(rows)} rows to {path}")
