"""Every Triton kernel compiles for an H100/H200 (sm_90) on this machine, GPU or not: Triton's own
compiler and ptxas, each kernel reached through its wrapper at a real model's shapes, in a process
without the interpreter (tests/kernels/hopper_compile.py)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KERNELS = {"_argmax_chunk_kernel", "_argmax_pick_kernel", "_rms_norm_kernel", "_gated_kernel", "_gemv_kernel",
           "_rotary_and_cache_kernel", "_paged_decode_kernel", "_prefill_kernel",
           "_apply_token_bitmask_kernel", "_lora_shrink_kernel", "_lora_expand_kernel",
           "_lora_expand_per_token_kernel", "_count_kernel", "_offsets_kernel", "_scatter_kernel",
           "_grouped_gemm_kernel"}


def test_every_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compiled here, not taken from an earlier run's cache
    run = subprocess.run([sys.executable, "-m", "tests.kernels.hopper_compile"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    lines = run.stdout.splitlines()
    assert all("cubin bytes" in line for line in lines), run.stdout
    assert {line.split(": ")[1].split(",")[0] for line in lines} == KERNELS
    decode = {line.split(":")[0]: line for line in lines if "_paged_decode_kernel" in line}
    # Batch 1 splits each context and merges the chunks through one counter add per program, by one
    # thread (CUTLASS's semaphore); batch 256 is one split a sequence, with no merge at all.
    assert decode["decode attention, batch 1"].endswith("atom.global.gpu.acq_rel.add.u32")
    assert "atom." not in decode["decode attention, batch 256"]


def test_every_kernel_module_is_compiled():
    """A new kernel module needs its case in hopper_compile.py (lora_mapping and the references have no kernel)."""
    modules = {path.stem for path in (ROOT / "kernels").glob("*.py")} - {"__init__", "lora_mapping"}
    modules = {m for m in modules if not m.endswith("_ref")}
    source = (ROOT / "tests" / "kernels" / "hopper_compile.py").read_text()
    assert {m for m in modules if f"from kernels.{m} import" not in source} == set()
