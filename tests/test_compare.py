"""benchmarks/compare.py: full-rank, SLTrain, CoLA, CoLA-M and GaLore on the same data, checked against independent counts.

One comparison of a micro size (d=32, 1 unrolled layer, vocab 512, 4 steps of 4 x 32 tokens) runs
once for the module; unrolled layers keep `colax.plan` to a single compile per model. Fira is left
out (GaLore's code path with one more term; tests/test_galore.py).
"""

import json
import math
import os
import sys
from pathlib import Path

import ml_collections
import pytest

from colax import config, model
from colax.projections import sltrain

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import compare  # noqa: E402

STEPS, BATCH, SEQ = 4, 4, 32
MICRO = [f"--steps={STEPS}", f"--batch_size={BATCH}", f"--micro_batch_size={BATCH}", f"--seq_len={SEQ}",
         "--vocab_size=512", "--log_every=1", "--eval_every=0", "--eval_batches=1",
         "--config.model.hidden_size=32", "--config.model.intermediate_size=64", "--config.model.rank=8",
         "--config.model.num_layers=1", "--config.model.scan_layers=False", "--config.model.dtype=float32",
         "--config.data.tokenizer_sample_docs=20", "--config.data.val_docs=16", "--runs=llama,sltrain,cola,cola_m,galore,relora",
         "--config.optim.rank=4", "--config.optim.update_proj_gap=2"]

pytestmark = pytest.mark.slow  # runs benchmarks/compare.py's trainings: CI runs it on Python 3.11 only


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    return out, compare.main(MICRO + [f"--out={out}"])


def trained_spec(out, name):
    """The ModelSpec of the config the loop wrote into the run's workdir."""
    with open(out / name / "config.json") as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    return model.spec_from_config(cfg.model), cfg


def test_files_and_table_structure(report):
    out, r = report
    labels = ["full-rank", "SLTrain", "CoLA", "CoLA-M", "GaLore", "ReLoRA"]
    assert [row["label"] for row in r["runs"]] == labels
    lines = r["table"].splitlines()
    assert len(lines) == 2 + len(labels) and all(line.count("|") == 24 for line in lines)
    assert [line.split("|")[1].strip() for line in lines[2:]] == labels
    assert r["table"] in (out / "compare.md").read_text()
    assert json.loads((out / "compare.json").read_text())["table"] == r["table"]
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    for line in lines[2:]:  # measured peak memory: CPU reports none
        assert line.split("|")[17].strip() == "n/a"


def test_numbers_match_independent_counts(report):
    out, r = report
    rows = {row["name"]: row for row in r["runs"]}
    flops = {}
    for name, row in rows.items():
        spec, cfg = trained_spec(out, name)
        counts = model.count_params(spec)
        assert (row["params"], row["embedding_params"]) == (counts["total"], counts["embeddings"])
        flops[name] = model.flops_per_token(spec, SEQ)["train"]
        assert row["flops_per_token"] == flops[name]
        assert row["remat"] == spec.remat == {"llama": "none", "sltrain": "none", "cola": "none", "cola_m": "cola_m",
                                              "galore": "none", "relora": "none"}[name]
        assert row["projection"] == spec.projection == {"llama": "dense", "cola_m": "cola", "galore": "dense",
                                                        "relora": "lora"}.get(name, name)
        assert cfg.data.tokenizer == str(out / "tokenizer.model")
        assert row["eval_ppl"] == pytest.approx(math.exp(row["eval_loss"]))
        assert row["eval_loss"] == row["metrics"][-1]["eval_loss"]
    assert rows["llama"]["lr"] == config.FULL_RANK_LR and rows["cola"]["lr"] == config.SIZES["tiny"][5]
    assert rows["sltrain"]["lr"] == sltrain.LR
    cells = {line.split("|")[1].strip(): line.split("|") for line in r["table"].splitlines()[2:]}
    assert cells["CoLA"][9].strip() == f"{flops['cola'] / flops['llama']:.2f}"
    assert cells["CoLA"][5].strip() == f"{rows['cola']['params'] / rows['llama']['params']:.2f}"
    assert cells["SLTrain"][5].strip() == f"{rows['sltrain']['params'] / rows['llama']['params']:.2f}"
    assert rows["cola_m"]["params"] == rows["cola"]["params"]
    # GaLore: the full-rank model; its optimizer state by hand (d=32, f=64, 1 layer, rank 4): Adam
    # on all but q, k, v, o, gate, up, down; r (n + 2m) for the rows >= cols ones (q, k, v, o,
    # down), r (m + 2n) for gate and up; three int32 counts. AdamW: 2 moments, the schedule's count
    # and optax's Adam step count (the full-rank kind asks for no per-vector counts).
    total, projected = rows["llama"]["params"], 4 * 32 * 32 + 3 * 32 * 64
    low_rank = 4 * 4 * (32 + 2 * 32) + 4 * (32 + 2 * 64) + 2 * 4 * (32 + 2 * 64)
    assert rows["galore"]["params"] == total and rows["galore"]["optimizer"] == "galore"
    assert rows["llama"]["optimizer_state_bytes"] == 8 * total + 4 + 4
    assert rows["galore"]["optimizer_state_bytes"] == 8 * (total - projected) + 4 * low_rank + 12
    assert cells["GaLore"][23].strip() == f"{rows['galore']['optimizer_state_bytes'] / (8 * total + 100):.2f}"
    assert rows["galore"]["lr"] == 0.01
    # ReLoRA: W [out, in] frozen beside A [r, in], B [out, r] (r = 8); Adam state for all but W, with
    # optax's one step count (LoRA asks for no per-vector counts).
    weights, factors = 4 * 32 * 32 + 3 * 32 * 64, 4 * 8 * (32 + 32) + 3 * 8 * (32 + 64)
    assert rows["relora"]["params"] == total + factors and rows["relora"]["lr"] == config.FULL_RANK_LR
    assert rows["relora"]["optimizer_state_bytes"] == 8 * (total - weights + factors) + 4 + 4
    # The tiny recipe (of 300 steps: warm start 75 with warmup 15, then warmup 7, restarts every 75,
    # re-warmups 18) scaled to 4 steps: warm start 1 (its warmup 1: lr 0), then a fresh schedule
    # without warmup (step 2 at the peak) restarting at its counts 1 and 2 (steps 3, 4 at lr 0).
    assert [m["lr"] for m in rows["relora"]["metrics"]] == pytest.approx([0, config.FULL_RANK_LR, 0, 0])


def test_same_tokens_and_same_start(report):
    """Same tokens for all; CoLA and CoLA-M (same init, same batches) log the same losses."""
    _, r = report
    rows = {row["name"]: row for row in r["runs"]}
    assert {row["tokens"] for row in r["runs"]} == {STEPS * BATCH * SEQ}
    for row in r["runs"]:
        assert [m["step"] for m in row["metrics"]] == list(range(1, STEPS + 1))
    cola, cola_m = ([m["loss"] for m in rows[n]["metrics"]] for n in ("cola", "cola_m"))
    assert cola_m[0] == pytest.approx(cola[0], rel=1e-6)
    assert cola_m == pytest.approx(cola, rel=1e-4)
    assert rows["llama"]["metrics"][0]["loss"] != pytest.approx(cola[0], rel=1e-6)


def test_bad_override_is_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="no such config key"):
        compare.main(MICRO + ["--config.model.bogus=1", f"--out={tmp_path}"])
    assert not os.listdir(tmp_path)
