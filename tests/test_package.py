"""llmm-tune installed from its wheel, outside the checkout, knows its tasks: the shipped spaces travel inside the
package, and the console script runs the commands."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_installed_outside_the_checkout_resolves_a_shipped_space(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("llmm_tune-*.whl")
    env = tmp_path / "env"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the test environment's packages, visible as a plain path: its editable finder of the checkout is not loaded
    Path(site, "test_environment.pth").write_text(sysconfig.get_path("purelib") + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                                str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(python), "-c", "import llmm_tune; print(llmm_tune.__file__)"], cwd=work,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the wheel's package, not the checkout's
    space = work / "cola.yaml"
    run = subprocess.run([str(env / "bin" / "llmm-tune"), "search", "glue_cola", "--profile", "cpu", "--write-space",
                          str(space)], cwd=work, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "wrote the resolved search space" in run.stdout
    assert "family: glue" in space.read_text() and "mcc" in space.read_text()
