"""The Triton kernels compile for an H100/H200 (sm_90) on this machine, GPU or not: Triton's own
compiler and ptxas, in a process without the interpreter (tests/kernels/hopper_compile.py)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compiled here, not taken from an earlier run's cache
    run = subprocess.run([sys.executable, "-m", "tests.kernels.hopper_compile"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    lines = run.stdout.splitlines()
    assert len(lines) == 9 and all("cubin bytes" in line for line in lines), run.stdout
    # The split decode merges through one counter add per program, by one thread (CUTLASS's semaphore);
    # a launch of one split has no merge at all.
    assert "atom.global.gpu.acq_rel.add.u32" in next(line for line in lines if "16 splits" in line)
    assert "atom." not in next(line for line in lines if " 1 splits" in line)
