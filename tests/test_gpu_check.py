"""benchmarks/gpu_check.py, the command for a lent GPU, runs every part up to the CUDA calls on the CPU: the NF4
base trained across an evaluation, merged and exported to peft with the adapter's logits, the step against peft's
LoRA, LoftQ's time and, without Ray, 4 packed trainings against one, each line naming the device."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.helpers.search_fixtures import ENV, ROOT


def test_the_gpu_check_runs_on_the_cpu_up_to_the_cuda_calls():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu"], capture_output=True,
                         text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("[cpu] ")]
    assert len(lines) == 5 and "Writing" not in run.stdout + run.stderr  # no progress bars
    merged, exported = map(float, re.search(r"merged (\S+), peft export reloaded (\S+)$", lines[1]).groups())
    assert merged < 1e-4 and exported < 1e-4
    assert re.search(r"Llmm \(K=2\) [\d.]+ ms, peft LoRA [\d.]+ ms, ratio [\d.]+$", lines[2])
    assert re.search(r"LoftQ of one 256x256 layer .*: [\d.]+ s, relative error 0\.0\d+$", lines[3])
    assert re.search(r"4 Llmm trainings at once on one device \(no Ray\): [\d.]+ steps/s together against "
                     r"[\d.]+ alone", lines[4])
