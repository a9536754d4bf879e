"""The package's outer contracts: light imports, the console script, README and CI agreeing."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

import compressor
from compressor.cli import app

ROOT = Path(__file__).resolve().parents[1]

BLOCK_NON_TORCH = """
import importlib.abc, sys
BLOCKED = {"pydantic", "typer", "yaml", "rich", "onnx", "onnxruntime", "torch_pruning", "click"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
import compressor.mfac as mfac
assert {"FisherInverse", "SlidingFisherInverse", "MFAC"} <= set(mfac.__all__)
loaded = sorted(m for m in sys.modules if m.startswith("compressor"))
print(" ".join(loaded))
"""


def test_mfac_imports_with_torch_alone():
    """The GPU machine has torch but no pydantic: compressor.mfac must not need anything else."""
    done = subprocess.run([sys.executable, "-c", BLOCK_NON_TORCH], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert "compressor.mfac" in loaded
    assert all(name == "compressor" or name.startswith("compressor.mfac") for name in loaded), loaded


def test_cli_version_and_help():
    runner = CliRunner()
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.strip() == f"compressor {compressor.__version__}"
    helped = runner.invoke(app, ["--help"])
    assert helped.exit_code == 0 and "M-FAC" in helped.output


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("compressor")
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and compressor.__version__ in done.stdout


def test_ci_runs_the_readme_test_command():
    """README.md starts with two set-up commands: the main job, then the tests; .ci/run runs the latter."""
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```(?:bash|sh)\n(.+?)\n```", readme, flags=re.S)
    assert len(commands) >= 2, "README.md needs the two set-up commands in ```bash blocks"
    main_job, tests = commands[0].strip(), commands[1].strip()
    assert "pytest" in tests and "pytest" not in main_job and "compressor run recipes/" in main_job
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci


#: The docs pages whose ```python blocks run in one namespace, in this order.
EXAMPLE_PAGES = ("training-loops.md", "mfac.md")


def test_docs_python_examples_run(tmp_path, monkeypatch):
    """Every ```python block of the docs' loop and M-FAC pages runs, in order, in one namespace."""
    pages = "\n".join((ROOT / "docs" / page).read_text() for page in EXAMPLE_PAGES)
    blocks = re.findall(r"```python\n(.+?)\n```", pages, flags=re.S)
    assert len(blocks) >= 3
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs", "exec"), namespace)
    assert namespace["saliency"].shape == (100_000,) and bool(namespace["saliency"].isfinite().all())
    assert namespace["step"].shape == (100_000,)
    assert namespace["streamed"].num_grads == 1024 and bool(namespace["z"].isfinite().all())
    assert (tmp_path / "opt.pt").exists()
    assert abs(namespace["session"].masks.global_sparsity() - 0.8) < 1e-3  # the user-loop example pruned
