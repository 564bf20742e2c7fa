"""Per-process set-up: a client process pays torch's one-off optimizer import (``torch._dynamo``)
while it starts, so building and stepping its optimizers in a round imports nothing more of it."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import torch
from fedq.models.optim import OPTIMIZERS, make_optimizer
from fedq.runtime.setup import preload_optimizers

assert "torch._dynamo" not in sys.modules, "already imported: the probe shows nothing"
preload_optimizers()
before = set(sys.modules)
for name in OPTIMIZERS:
    model = torch.nn.Linear(3, 2)
    opt = make_optimizer(model.parameters(), name, lr=0.1, weight_decay=0.01)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
late = set(sys.modules) - before
print(sorted(m for m in late if m.startswith(("torch._dynamo", "torch._inductor"))))
"""


def test_preloading_leaves_nothing_of_torch_dynamo_for_the_first_round() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
