#!/usr/bin/env python3
"""BoolQ ships here without its training split (data/README.md), so the IVON-LoRA suite trains on
a seeded split of the 3,270 dev questions, stated once and committed:

    python3 scripts/split_boolq.py     # writes data/boolq/train_from_dev.jsonl (2,270 rows) and
                                       # data/boolq/dev_holdout.jsonl (1,000 rows)

random.Random(0).shuffle over the row indices of data/boolq/dev.jsonl; the first 2,270 shuffled
rows train, the other 1,000 (in their original order) evaluate. No question is in both files.
The task `boolq` trains on the first file and evaluates on the second.
"""
import os
import random

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "boolq")
rows = open(os.path.join(here, "dev.jsonl"), encoding="utf-8").read().splitlines()
assert len(rows) == 3270, len(rows)
idx = list(range(len(rows)))
random.Random(0).shuffle(idx)
train, held = sorted(idx[:2270]), sorted(idx[2270:])
for name, part in [("train_from_dev.jsonl", train), ("dev_holdout.jsonl", held)]:
    with open(os.path.join(here, name), "w", encoding="utf-8") as f:
        f.write("".join(rows[i] + "\n" for i in part))
print(f"train {len(train)}, eval {len(held)}")
