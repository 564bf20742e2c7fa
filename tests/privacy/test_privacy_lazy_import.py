"""``import fedq.privacy`` must not import opacus (or other heavy stacks): they load on use."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("opacus", "transformers", "peft", "ray")


def test_importing_privacy_does_not_import_opacus() -> None:
    code = f"import sys, fedq.privacy; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
