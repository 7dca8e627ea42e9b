"""`colax.plan`: XLA's compiled FLOPs agree with the analytic count; the JSON interface."""

import functools
import json
import subprocess
import sys

import jax
import pytest

from colax import config, model, plan


def test_scanned_flops_count_equals_the_unrolled_count():
    cfg = config.preset("cola", "tiny")
    cfg.model.update(num_layers=4)
    spec = config.validate(cfg)
    extrapolated = plan.step_flops(spec, cfg, 2, 32)
    unrolled = plan.step_flops(spec.replace(scan_layers=False), cfg, 2, 32)
    # Same matmuls per block; the scanned program has a little more elementwise work (measured:
    # 0.85% here, 1.25% for 60M at 2 x 256, 0.2% per block at 1B).
    assert extrapolated == pytest.approx(unrolled, rel=0.015)


def test_analytic_flops_by_hand():
    # Full-rank 60M, T=256: per layer 2*(4 d^2 + 3 d f) + 4 T d, plus the lm_head 2 d V.
    d, f, v, t, layers = 512, 1376, 32000, 256, 8
    fwd = layers * (2 * (4 * d * d + 3 * d * f) + 4 * t * d) + 2 * d * v
    got = model.flops_per_token(config.validate(config.preset("llama", "60m")), t)
    assert got == dict(forward=fwd, train=3 * fwd)
    # LoRA, r = 128: the factors' 2 r (in + out) on top; W frozen: its x Wᵀ has no weight gradient.
    r, full = 128, 2 * (4 * d * d + 3 * d * f)
    lora_fwd = fwd + layers * 2 * r * (4 * 2 * d + 3 * (d + f))
    got = model.flops_per_token(config.validate(config.preset("lora", "60m")), t)
    assert got == dict(forward=lora_fwd, train=3 * lora_fwd - layers * full)


@functools.lru_cache  # (cola, "xla") serves two tests: compiled once
def _xla_per_token(kind, attention_impl):
    """XLA's training FLOPs per token of the 60M preset at its micro-batch (32 x 256)."""
    cfg = config.preset(kind, "60m")
    cfg.model.attention_impl = attention_impl
    spec = config.validate(cfg)
    batch = cfg.train.micro_batch_size
    return plan.step_flops(spec, cfg, batch, 256) / (batch * 256), spec


@pytest.mark.parametrize("kind", ["cola", "llama", "lora"])
def test_xla_flops_within_3_percent_of_analytic(kind):
    # jax's attention, which recomputes nothing. The analytic count has no elementwise work and no
    # optimizer update; XLA counts both (measured at 60M: CoLA 2.5%, full-rank 1.4%).
    xla_per_token, spec = _xla_per_token(kind, "xla")
    assert xla_per_token == pytest.approx(model.flops_per_token(spec, 256)["train"], rel=0.03)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="colax.attention is the CPU backend's default")
def test_cpu_attention_adds_one_qk_product_per_layer():
    """colax.attention's backward recomputes q k^T: 2 T d FLOPs per token and layer more than jax's
    attention (measured at 60M: 1.82M of the 2.10M per token; jax's counts more elementwise work)."""
    ours, spec = _xla_per_token("cola", "")
    jax_attention, _ = _xla_per_token("cola", "xla")
    assert ours - jax_attention == pytest.approx(spec.num_layers * 2 * 256 * spec.hidden_size, rel=0.2)


@pytest.mark.slow
def test_cola_over_full_rank_training_flops_at_1b():
    ratios = {}
    for source in ("analytic", "xla"):
        per_token = {}
        for kind in ("cola", "llama"):
            cfg = config.preset(kind, "1b")
            spec = config.validate(cfg)
            per_token[kind] = (model.flops_per_token(spec, 256)["train"] if source == "analytic"
                               else plan.step_flops(spec, cfg, 1, 256) / 256)
        ratios[source] = per_token["cola"] / per_token["llama"]
    assert ratios["analytic"] == pytest.approx(0.438, abs=0.0005)
    assert ratios["xla"] <= 0.45


def test_cli_json_has_the_documented_keys():
    out = subprocess.run([sys.executable, "-m", "colax.plan", "--config", "configs/tiny.py", "--json"],
                         capture_output=True, text=True, check=True)
    p = json.loads(out.stdout)
    assert p["params"] == model.count_params(config.validate(config.from_file("configs/tiny.py")))["total"]
    for key in ("lowrank_params", "tokens_per_step", "flops_per_token", "xla_flops_per_step"):
        assert isinstance(p[key], (int, float)) and p[key] > 0
    assert set(p["memory"]) >= {"argument_bytes", "output_bytes", "temp_bytes"}
    # fp32 params and two Adam moments are arguments of the step.
    assert p["memory"]["argument_bytes"] >= 3 * 4 * p["params"] and p["memory"]["temp_bytes"] > 0


# --topology (compiled by libtpu: tests/test_tpu_compile.py); what needs no libtpu is tested here.
_HLO = """
  %all-reduce.43 = (bf16[32,344]{1,0:T(8,128)(2,1)S(1)}, f32[]{:T(128)}) all-reduce(%fusion.701, %r), channel_id=4
  %get-tuple-element.5762 = bf16[32,344]{1,0:T(8,128)(2,1)S(1)} get-tuple-element(%all-reduce.43), index=0
  %all-gather-start = (f32[8,128]{1,0}, f32[32,128]{1,0}) all-gather-start(%p), dimensions={0}
  %all-gather-done = f32[32,128]{1,0} all-gather-done(%all-gather-start)
  %reduce-scatter.2 = pred[64]{0} reduce-scatter(%q), dimensions={0}, to_apply=%add
  %fusion.3 = f32[4]{0} fusion(%all-reduce.43), kind=kLoop, calls=%fused_computation
"""


def test_collective_bytes_by_kind_from_hlo():
    assert plan.collective_bytes(_HLO) == {"all-reduce": dict(count=1, bytes=32 * 344 * 2 + 4),
                                           "all-gather": dict(count=1, bytes=32 * 128 * 4),
                                           "reduce-scatter": dict(count=1, bytes=64)}


def test_needed_bytes_from_the_tpu_compilers_message():
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(31.51G) exceeds available HBM (15.75G).")  # libtpu 0.0.42.1, CoLA 1B at 32 x 256 on v5e
    assert plan.needed_bytes(message) == ("HLO temporaries", 31.51 * 2**30, 15.75 * 2**30)
    assert plan.needed_bytes("RESOURCE_EXHAUSTED: something else") is None


def test_a_step_that_does_not_fit_is_one_line_with_the_change_that_fits():
    p = dict(topology="v5e:2x2", num_slices=1, chips=4, device_kind="TPU v5 lite", mesh=dict(data=4, fsdp=1, tensor=1),
             accum_steps=1, tokens_per_step=32768, param_bytes=2**30, optimizer_bytes=2**31, fits=False,
             error="RESOURCE_EXHAUSTED: ...", needed_for="HLO temporaries", needed_bytes=31.5 * 2**30,
             compiler_hbm_bytes=15.75 * 2**30, fit_change="--config.train.micro_batch_size=8")
    last = plan.format_tpu_text(p).splitlines()[-1]
    assert last == ("HBM               does not fit: the TPU compiler says its HLO temporaries need 31.50 GiB, "
                    "the chip has 15.75 GiB; fits with --config.train.micro_batch_size=8")


def test_unknown_tpu_generation_is_one_line():
    out = subprocess.run([sys.executable, "-m", "colax.plan", "--config", "configs/tiny.py", "--topology", "v9:2x2"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: --topology=v9:2x2: unknown TPU generation 'v9' (known: v4, v5e, v5p, v6e), e.g. v5e:2x2"], out.stderr
