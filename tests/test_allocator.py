"""`cosa.allocator`: freed tensor memory stays in the process (page faults counted, not timed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import cosa.allocator as allocator

# Allocate, touch and free a 64 MiB block five times; count the minor page faults of the last
# four (the first one faults its pages in whatever the settings).
CHURN = """
import json, resource, sys
import numpy as np
from cosa.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else False
np.ones(16 << 20, dtype=np.float32)  # first touch
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    np.ones(16 << 20, dtype=np.float32)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _churn(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in allocator.USER_SETTINGS}
    out = subprocess.run(
        [sys.executable, "-c", CHURN, mode],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_blocks_are_reused_without_page_faults() -> None:
    default = _churn("default")
    tuned = _churn("tuned")
    assert tuned["applied"] is True
    # By default every block is mapped afresh and faulted in again: at least one fault per 2 MiB
    # (the kernel may back it with huge pages), 128 for the four blocks.
    assert default["faults"] >= 128
    assert tuned["faults"] < 0.05 * default["faults"]  # the heap's pages are reused


def test_the_user_s_choice_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("COSA_MALLOC", "system"), ("MALLOC_MMAP_MAX_", "65536")):
        monkeypatch.setattr(allocator, "_applied", None)
        with monkeypatch.context() as env:
            env.setenv(name, value)
            assert allocator.keep_freed_memory() is False
    assert _churn("tuned", COSA_MALLOC="system")["applied"] is False
