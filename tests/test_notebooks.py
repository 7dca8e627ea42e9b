"""The notebooks run top to bottom (COLAX_NOTEBOOK_BUDGET=small) and are committed without outputs.

Each notebook's code cells are joined into one script, IPython lines (`%pip ...`, `!git ...`)
replaced by `pass`, and run in a fresh Python process (no Jupyter kernel) from a temporary
`notebooks/` folder next to a link to the repository's `configs/`, as Jupyter would run it from
the checkout; plots go to matplotlib's Agg backend.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def cells(path):
    return json.loads(path.read_text())["cells"]


def script(path):
    """The notebook's code cells as one Python script; IPython-only lines become `pass`."""
    lines = []
    for cell in cells(path):
        if cell["cell_type"] == "code":
            for line in "".join(cell["source"]).splitlines():
                code = line.lstrip()
                lines.append(line[:len(line) - len(code)] + "pass" if code.startswith(("%", "!")) else line)
    return "\n".join(lines) + "\n"


def test_the_notebooks_are_there():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "low_rank_activations.ipynb", "scaling_out.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = cells(path)
    assert nb[0]["cell_type"] == "markdown", "the first cell says what the notebook shows and how long it takes"
    for i, cell in enumerate(nb):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path.name} cell {i}: clear outputs"


def first_code_cell(path):
    return "".join(next(c for c in cells(path) if c["cell_type"] == "code")["source"])


def test_one_setup_cell_for_colab_and_a_fresh_kernel():
    setup = first_code_cell(NOTEBOOKS[0])
    assert all(first_code_cell(path) == setup for path in NOTEBOOKS)
    code = [line for line in setup.splitlines() if line and not line.startswith("#")]
    assert code[0].startswith("COLAX_REPO = ") and setup.count("COLAX_REPO = ") == 1  # the URL, in one place
    assert '"install", "-q", "..[notebooks]"' in setup and "-e" not in setup.split()  # not editable: no restart
    assert "importlib.invalidate_caches()" in setup
    assert setup.rstrip().splitlines()[-1].startswith("host.reuse_freed_memory()")  # before any cell starts JAX
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'notebooks = ["matplotlib' in pyproject
    for path in NOTEBOOKS:  # matplotlib is the only import beyond colax and the dev tools' numpy/jax
        imports = {line.split()[1].split(".")[0] for line in script(path).splitlines()
                   if line.startswith(("import ", "from "))}
        assert imports <= {"colax", "matplotlib", "numpy", "jax", "os", "json", "importlib", "math"}, imports


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_with_the_small_budget(path, tmp_path):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "pyproject.toml").symlink_to(ROOT / "pyproject.toml")  # a checkout: the setup cell clones nothing
    cwd = tmp_path / "notebooks"
    cwd.mkdir()
    code = cwd / f"{path.stem}.py"
    code.write_text(script(path))
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0"  # compile faster
    env = {**os.environ, "COLAX_NOTEBOOK_BUDGET": "small", "MPLBACKEND": "Agg", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": flags}
    result = subprocess.run([sys.executable, code.name], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
