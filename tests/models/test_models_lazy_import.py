"""``import fedq.data, fedq.models`` must not pull heavy stacks (they are imported on use)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("transformers", "peft", "opacus", "sklearn", "mnist1d", "ray", "triton")


def test_importing_data_and_models_stays_light() -> None:
    code = (
        "import sys, fedq.data, fedq.models; "
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
