"""benchmarks/cpu_step.py: its table at a tiny size, and that its PyTorch models are colax's models
(the same first-step loss from the same weights). No timing is checked."""

import math
import sys
from pathlib import Path

import pytest

from conftest import authors_package

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import cpu_step  # noqa: E402

TINY = dict(size="tiny", dtype="float32", batch=2, seq_len=16, overrides=[])


def test_table_rows_at_a_tiny_size(capsys, monkeypatch):
    """One timed step (after one that compiles) of colax's tiny full-rank and CoLA models, timed in turn:
    each row holds a finite, positive tokens/s, and CoLA's row its ratio to full-rank's."""
    monkeypatch.setenv("COLAX_MALLOC", "system")  # pytest's process: leave its malloc alone (colax.host)
    cpu_step.main(["--size", "tiny", "--batch", "2", "--seq_len", "16", "--rows", "llama,cola", "--dtypes", "float32",
                   "--warmup", "1", "--steps", "1", "--rounds", "1", "--no_torch"])
    out = capsys.readouterr().out
    assert "malloc: system" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("llama ", "cola "))}
    tokens_per_s = {name: float(row[2]) for name, row in rows.items()}
    assert all(math.isfinite(t) and t > 0 for t in tokens_per_s.values()), rows
    assert float(rows["cola"][-1]) == pytest.approx(tokens_per_s["cola"] / tokens_per_s["llama"], abs=0.01)


@pytest.mark.parametrize("name", ["llama", "cola_m"])
def test_torch_step_starts_from_colax_model(name):
    """The first step's loss (before any update) of the torch model (transformers' LlamaForCausalLM;
    the authors' CoLA-M checkpoint segments) equals colax's on the same weights and tokens, to 1e-5
    relative: the two sides time the same model."""
    authors_package("torch"), authors_package("transformers")
    cfg = cpu_step.colax_config(name, **TINY)
    tokens = cpu_step.random_tokens(cfg.model.vocab_size, TINY["batch"], TINY["seq_len"])
    colax_run, params = cpu_step.colax_step(cfg, tokens)
    torch_run = cpu_step.torch_step(name, cfg, tokens, params)
    assert torch_run() == pytest.approx(colax_run(), rel=1e-5)


def test_a_non_finite_loss_names_the_row_and_side():
    sides = {("cola", "colax"): lambda: 1.0, ("cola", "torch"): lambda: math.nan}
    with pytest.raises(SystemExit, match=r"^cola torch: non-finite loss nan$"):
        cpu_step.interleaved(sides, warmup=0, steps=1, rounds=1)
