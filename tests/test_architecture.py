"""The architecture holds: the import contracts of .importlinter (layers, the data path, independent
projection kinds) pass, and break on an upward import or a cycle; docs/architecture.md shows the
contract's layers; every command line's --help prints its own usage and flags."""

import ast
import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
LINT = ("import sys; from importlinter import cli; "
        "sys.exit(cli.lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))")


def lint(package_root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` with the repository's contracts on the colax package found in `package_root`."""
    env = dict(os.environ, PYTHONPATH=str(package_root))
    return subprocess.run([sys.executable, "-c", LINT, str(ROOT / ".importlinter")], capture_output=True, text=True,
                          cwd=package_root, env=env, timeout=300)


def test_the_import_contracts_hold():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout, done.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("errors.py", "from colax import loop", "colax in layers"),  # the bottom imports the top
    ("sources.py", "from colax import data", "the data path calls downward"),  # documents import the pipeline
    ("rows.py", "from colax import tokenizer", "the data path calls downward"),  # a cycle: tokenizer imports rows
    ("config.py", "from colax import data", "config and tokenizer import no pipeline code"),
    ("projections/cola.py", "from colax.projections import lora", "no projection kind imports another"),
])
def test_an_upward_import_breaks_a_contract(module, line, contract, tmp_path):
    shutil.copytree(ROOT / "colax", tmp_path / "colax", ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "colax" / module, "a") as f:
        f.write(f"\n{line}  # noqa\n")
    done = lint(tmp_path)
    assert done.returncode != 0, done.stdout + done.stderr
    assert re.search(re.escape(contract) + r"[^\n]*\n?[^\n]*BROKEN", done.stdout), done.stdout


# Imports of colax modules inside a function, each for a reason other than an import cycle (which the
# contracts forbid anyway): the beam extra is imported only when --runner asks for it (it raises
# without apache-beam).
FUNCTION_IMPORTS = {("colax/prepare_cli.py", "colax.prepare_beam")}


def test_no_colax_import_inside_a_function_but_the_listed_ones():
    found = set()
    for path in sorted((ROOT / "colax").rglob("*.py")):
        for func in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(func):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("colax"):
                    names = [node.module] if node.module != "colax" else [f"colax.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names if a.name.startswith("colax")]
                else:
                    continue
                found |= {(str(path.relative_to(ROOT)), name) for name in names}
    assert found == FUNCTION_IMPORTS


def test_the_docs_show_the_contracts_layers():
    contracts = configparser.ConfigParser()
    contracts.read(ROOT / ".importlinter")
    layers = [layer.strip() for layer in contracts["importlinter:contract:layers"]["layers"].strip().splitlines()]
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"<!-- layers: \.importlinter -->\n```\n(.*?)```", text, re.DOTALL)
    assert block, "docs/architecture.md: no layers block"
    shown = [re.sub(r"\s{2,}.*", "", row).strip() for row in block.group(1).splitlines() if row.strip()]
    assert shown == layers, "docs/architecture.md's layers differ from .importlinter's"


@pytest.mark.parametrize("command, usage, own_flags", [
    (["-m", "colax.data", "prepare"], "python -m colax.data prepare",
     ["config", "out", "workers", "records_per_shard", "overwrite", "runner"]),
    (["-m", "colax.data", "verify"], "python -m colax.data verify DIR", ["out"]),
    (["-m", "colax.tokenizer", "train"], "usage: python -m colax.tokenizer train", ["source", "vocab-size", "out"]),
    (["-m", "colax.evaluate"], "python -m colax.evaluate",
     ["workdir", "step", "config", "max_tokens", "convention", "batch_rows"]),
    (["-m", "colax.generate"], "python -m colax.generate", ["workdir", "step", "config", "prompt", "max_new_tokens"]),
    (["-m", "colax.convert"], "python -m colax.convert export", ["workdir", "out", "format", "overwrite"]),
    (["-m", "colax.plan"], "python -m colax.plan", ["config", "remat", "json"]),
    (["train.py"], "python train.py", ["config", "workdir", "smoke"]),
])
def test_every_cli_help_prints_its_own_usage_and_flags(command, usage, own_flags):
    """--help exits 0 with the command's usage and its flags listed (a line of their own: absl's
    `  --name:`, argparse's `  --name ...`), not only those of the module that runs it."""
    done = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0 and usage in done.stdout, done.stdout + done.stderr
    missing = [f for f in own_flags if not re.search(rf"^\s+--(\[no\])?{re.escape(f)}\b", done.stdout, re.MULTILINE)]
    assert not missing, f"{' '.join(command)} --help lists no {missing}:\n{done.stdout}"
