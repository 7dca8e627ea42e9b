"""benchmarks/cpu_step.py and benchmarks/torch_step.py: the table at a tiny size, that the PyTorch
models are colax's models (the same first-step loss from the same weights, in this process and in a
process of torch_step's own), that torch_step's process imports no jax and leaves malloc alone, and
that the separate-process mode alternates its processes and reports every field. No timing is checked."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import authors_package

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import cpu_gemm  # noqa: E402
import cpu_step  # noqa: E402
import gemm_side  # noqa: E402
import step_common  # noqa: E402
from colax import config  # noqa: E402
from colax import model as model_lib  # noqa: E402

TINY = dict(size="tiny", dtype="float32", batch=2, seq_len=16, overrides=[])
TINY_ARGS = ["--size", "tiny", "--batch", "2", "--seq_len", "16", "--warmup", "1", "--steps", "1"]


def table_of(out):
    """{(row, dtype): row record} of the {"table": ...} JSON line of cpu_step's output."""
    line = next(line for line in out.splitlines() if line.startswith('{"table"'))
    return {(rec["row"], rec["dtype"]): rec for rec in json.loads(line)["table"]}


def tiny_start(name):
    """(cfg, tokens, colax's step function, its initial params) of row `name` at the tiny size."""
    cfg = cpu_step.colax_config(name, **TINY)
    tokens = step_common.random_tokens(cfg.model.vocab_size, TINY["batch"], TINY["seq_len"])
    return (cfg, tokens, *cpu_step.colax_step(cfg, tokens))


def test_table_rows_at_a_tiny_size(capsys, monkeypatch):
    """One timed step (after one that compiles) of colax's tiny full-rank and CoLA models, timed in turn
    in this process: each row holds a finite, positive median, and CoLA's row its ratio to full-rank's."""
    monkeypatch.setenv("COLAX_MALLOC", "system")  # pytest's process: leave its malloc alone (colax.host)
    cpu_step.main([*TINY_ARGS, "--rows", "llama,cola", "--dtypes", "float32", "--rounds", "1", "--no_torch",
                   "--same_process"])
    out = capsys.readouterr().out
    assert "same process, malloc: system" in out
    table = table_of(out)
    medians = {name: table[name, "float32"]["colax"]["median"] for name in ("llama", "cola")}
    assert all(math.isfinite(t) and t > 0 for t in medians.values()), table
    assert table["cola", "float32"]["over_full_rank"] == pytest.approx(medians["llama"] / medians["cola"])


@pytest.mark.parametrize("name", ["llama", "cola", "cola_m"])
def test_torch_step_starts_from_colax_model(name):
    """The first step's loss (before any update) of the torch model (transformers' LlamaForCausalLM;
    the authors' CoLA forward and their CoLA-M checkpoint segments, with the sdpa attention of their
    default) equals colax's on the same weights and tokens, to 1e-5 relative: the two sides time the
    same model."""
    authors_package("torch"), authors_package("transformers")
    import torch_step

    cfg, tokens, colax_run, params = tiny_start(name)
    torch_run, kernel = torch_step.training_step(name, cpu_step.spec(cfg), tokens,
                                                 torch_step.tensors(cpu_step.torch_tensors(name, params)))
    assert kernel == "sdpa"
    assert torch_run() == pytest.approx(colax_run(), rel=1e-5)


# Runs torch_step.py's main as `python benchmarks/torch_step.py ARGS` would, twice (malloc untouched,
# then --malloc colax), with glibc's mallopt replaced by a recorder; prints what each run saw.
PROBE = """
import json, runpy, sys
from colax import host
calls = []
class Libc:
    def mallopt(self, param, value):
        calls.append((param, value))
        return 1
host._glibc = Libc
here, args = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, here)
for extra in ([], ["--malloc", "colax"]):
    sys.argv = [here + "/torch_step.py", *args, *extra]
    summary = runpy.run_path(sys.argv[0], run_name="torch_step_probe")["main"]()
    print("PROBE " + json.dumps(dict(summary=summary, jax="jax" in sys.modules, mallopt=len(calls))), flush=True)
"""


def test_torch_step_process_is_the_in_process_step(tmp_path):
    """torch_step.py in a process of its own (sizes read from colax's preset through `cpu_step.py
    --spec`, colax's initial weights from an .npz) starts from the same loss as the same step built in
    this process (1e-6) and as colax's (1e-5); its process imports no jax and calls no mallopt unless
    --malloc colax, which sets colax.host's three parameters."""
    authors_package("torch"), authors_package("transformers")
    import torch_step

    cfg, tokens, colax_run, params = tiny_start("llama")
    arrays = cpu_step.torch_tensors("llama", params)
    np.savez(tmp_path / "w.npz", **arrays)
    in_process, _ = torch_step.training_step("llama", cpu_step.spec(cfg), tokens, torch_step.tensors(arrays))
    args = ["--row", "llama", "--dtype", "float32", *TINY_ARGS, "--threads", "1", "--weights", str(tmp_path / "w.npz")]
    env = {k: v for k, v in os.environ.items() if k != "COLAX_MALLOC"} | {"JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([str(BENCHMARKS.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", PROBE, str(BENCHMARKS), json.dumps(args)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain, colax_malloc = (json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("PROBE "))
    loss = in_process()
    assert plain["summary"]["first_loss"] == pytest.approx(loss, rel=1e-6)
    assert plain["summary"]["first_loss"] == pytest.approx(colax_run(), rel=1e-5)
    assert plain["summary"]["malloc"] == "system" and plain["mallopt"] == 0 and not plain["jax"]
    assert plain["summary"]["attention"] == "sdpa" and plain["summary"]["threads"] == 1
    assert colax_malloc["summary"]["malloc"] == "colax.host" and colax_malloc["mallopt"] == 3
    assert not colax_malloc["jax"]


def fake_summary(cmd, label, extra):
    """run_child's stand-in: a summary whose median is 1 s for colax, 2 s for torch, times (round + 1)."""
    side = "colax" if "--child" in cmd else "torch"
    row = cmd[cmd.index("--rows" if side == "colax" else "--row") + 1]
    median = (1.0 if side == "colax" else 2.0) * (extra["round"] + 1) * (1.5 if row == "cola" else 1.0)
    ORDER.append((row, side, extra["round"]))
    return dict(side=side, row=row, samples=[median], median=median, first_loss=10.0, round=extra["round"], threads=2)


ORDER = []


def test_separate_processes_alternate_and_report(capsys, monkeypatch):
    """The default mode runs a colax and a torch process per round, colax first in even rounds and
    torch first in odd ones, and reports per side the median over all samples, the rounds' medians,
    their spread, colax / torch and x full-rank, and the load before and after every row."""
    authors_package("torch")  # the children are fakes, but without torch the mode times colax only
    monkeypatch.setattr(cpu_step, "run_child", fake_summary)
    ORDER.clear()
    cpu_step.main([*TINY_ARGS, "--rows", "llama,cola", "--dtypes", "float32", "--rounds", "2"])
    assert ORDER == [(row, side, r) for row in ("llama", "cola")
                     for r, sides in enumerate((("colax", "torch"), ("torch", "colax"))) for side in sides]
    out = capsys.readouterr().out
    table = table_of(out)
    cola = table["cola", "float32"]
    assert cola["colax"]["round_medians"] == [1.5, 3.0] and cola["colax"]["spread"] == 2.0
    assert cola["colax"]["median"] == 2.25 and cola["torch"]["median"] == 4.5
    assert cola["colax_over_torch"] == 2.0 and cola["over_full_rank"] == pytest.approx(1.5 / 2.25)
    assert cola["colax"]["settings"] == {"threads": 2}
    assert len(cola["load_before"]) == 3 and len(cola["load_after"]) == 3
    assert "separate processes" in out and "load average after" in out


def test_separate_processes_end_to_end(capsys):
    """One round of real processes for tiny full-rank: every timed step and each process's summary
    come back as JSON lines, and both sides start from the same loss (colax's weights given to torch)."""
    authors_package("torch"), authors_package("transformers")
    cpu_step.main([*TINY_ARGS, "--rows", "llama", "--dtypes", "float32", "--rounds", "1", "--torch_threads", "1"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    steps = [rec for rec in lines if "step" in rec]
    assert sorted(rec["side"] for rec in steps) == ["colax", "torch"]
    assert all(rec["round"] == 0 and rec["seconds"] > 0 and math.isfinite(rec["loss"]) for rec in steps)
    row = table_of("\n".join(json.dumps(rec) for rec in lines))["llama", "float32"]
    assert row["torch"]["settings"]["malloc"] == "system" and row["torch"]["settings"]["weights"] == "given"
    assert row["colax"]["first_loss"] == pytest.approx(row["torch"]["first_loss"], rel=1e-5)


def test_a_non_finite_loss_names_the_row_and_side():
    sides = {("cola", "colax"): lambda: 1.0, ("cola", "torch"): lambda: math.nan}
    with pytest.raises(SystemExit, match=r"^cola torch: non-finite loss nan$"):
        cpu_step.interleaved(sides, "float32", warmup=0, steps=1, rounds=1)


@pytest.mark.parametrize("row", cpu_gemm.ROWS)
def test_the_gemm_floor_counts_every_projection_and_lm_head_flop_once(row):
    """benchmarks/cpu_gemm.py's products, three GEMMs of 2 FLOPs per weight entry and token each, are
    the model's analytic training FLOPs less attention's (colax.model.flops_per_token at seq_len 0):
    no product left out, none counted twice."""
    spec = config.validate(config.preset(row, "60m"))
    gemm = sum(3 * 2 * i * o * count for _, i, o, count in cpu_gemm.products(row, "60m"))
    assert gemm == model_lib.flops_per_token(spec, 0)["train"]


@pytest.mark.parametrize("side", ["xla", "torch"])
def test_gemm_side_times_the_products_the_step_computes(side):
    """Each side's three forms are x @ w, dy @ w^T and x^T @ dy (numpy's, float32 to 1e-5)."""
    if side == "torch":
        pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x, w, dy = (rng.standard_normal(s, np.float32) for s in ((5, 3), (3, 4), (5, 4)))
    forms = getattr(gemm_side, f"{side}_forms")(x, w, dy)
    expected = dict(forward=x @ w, input_grad=dy @ w.T, weight_grad=x.T @ dy)
    for form in gemm_side.FORMS:
        np.testing.assert_allclose(np.asarray(forms[form]()), expected[form], rtol=1e-5, atol=1e-5)
