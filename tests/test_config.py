"""Presets, parameter counts and one-line config errors."""

import subprocess
import sys

import pytest

from colax import config, model, projections
from colax.errors import ConfigError
from colax.projections import dense

# The paper's parameter counts (millions, to 0.01M): CoLA and full-rank LLaMA.
PAPER_PARAMS = {
    ("cola", "60m"): 42.77, ("cola", "130m"): 94.00, ("cola", "350m"): 185.22,
    ("cola", "1b"): 609.31, ("cola", "7b"): 2820.94,
    ("llama", "60m"): 58.07, ("llama", "130m"): 134.11, ("llama", "350m"): 367.97,
    ("llama", "1b"): 1339.08, ("llama", "7b"): 6738.42,
}


@pytest.mark.parametrize("kind,size", sorted(PAPER_PARAMS))
def test_parameter_counts_match_paper(kind, size):
    spec = config.validate(config.preset(kind, size))
    assert round(model.count_params(spec)["total"] / 1e6, 2) == PAPER_PARAMS[kind, size]


def test_count_by_hand_60m():
    # CoLA 60M: 8 blocks of 4 r(d+d) + 2 r(d+f) + r(f+d), 17 norms of d, two V x d tables.
    d, f, r, v, layers = 512, 1376, 128, 32000, 8
    lowrank = layers * (4 * r * 2 * d + 3 * r * (d + f))
    counts = model.count_params(config.validate(config.preset("cola", "60m")))
    assert counts["lowrank"] == lowrank
    assert counts["total"] == lowrank + (2 * layers + 1) * d + 2 * v * d


def test_recipe_in_presets():
    c = config.preset("cola", "1b")
    assert (c.optim.lr, c.train.steps, c.optim.warmup_steps, c.model.only_lr_act) == (0.002, 100_000, 10_000, True)
    assert (c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay, c.optim.grad_clip) == (0.9, 0.999, 1e-8, 0.01, 0.5)
    assert (c.optim.min_lr_ratio, c.train.batch_size, c.data.seq_len) == (0.1, 512, 256)
    assert config.preset("cola", "60m").model.only_lr_act is False
    llama = config.preset("llama", "1b")
    assert (llama.model.projection, llama.optim.lr, llama.train.steps) == ("dense", 0.001, 100_000)


def test_config_files_load_their_presets():
    for kind, size in PAPER_PARAMS:
        assert config.from_file(f"configs/{kind}_{size}.py") == config.preset(kind, size)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.model.update(num_heads=7), r"^model\.num_heads must divide hidden_size=512, got 7$"),
    (lambda c: c.model.update(rank=0), r"^model\.rank must be a positive integer, got 0$"),
    (lambda c: c.model.update(rank=-3), r"^model\.rank must be a positive integer, got -3$"),
    (lambda c: c.model.ranks.update(qq=4), r"^unknown config key model\.ranks\.qq \(known here: down, gate, k, o, q, up, v\)$"),
    (lambda c: c.model.update(projection="bogus"), r"^model\.projection must be one of"),
    (lambda c: c.model.update(remat="sometimes"), r"^model\.remat must be one of"),
    (lambda c: c.model.update(dtype="float16"), r"^model\.dtype must be one of"),
    (lambda c: c.train.update(steps=0), r"^train\.steps must be a positive integer, got 0$"),
    (lambda c: c.optim.update(warmup_steps=20_000), r"^optim\.warmup_steps must be in"),
    (lambda c: c.model.update(colour="red"), r"^unknown config key model\.colour \(known here: attention_impl, "),
    (lambda c: c.update(extra=1), r"^unknown config key extra \(known here: data, mesh, model, optim, train\)$"),
])
def test_bad_configs_fail_with_one_line_naming_the_field(edit, message):
    c = config.preset("cola", "60m")
    edit(c)
    with pytest.raises(ConfigError, match=message) as e:
        config.validate(c)
    assert "\n" not in str(e.value)


def test_full_rank_rejects_low_rank_only_options():
    c = config.preset("llama", "60m")
    c.model.remat = "cola_m"
    with pytest.raises(ConfigError, match=r"^model\.remat needs a low-rank projection"):
        config.validate(c)
    c = config.preset("llama", "60m")
    c.model.only_lr_act = True
    with pytest.raises(ConfigError, match=r"^model\.only_lr_act"):
        config.validate(c)


def test_cli_bad_config_is_one_line():
    out = subprocess.run([sys.executable, "-m", "colax.plan", "--config", "configs/cola_60m.py",
                          "--config.model.num_heads=7"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "error: model.num_heads must divide hidden_size=512, got 7"
    assert "Traceback" not in out.stderr


def test_cli_unknown_override_is_one_line():
    out = subprocess.run([sys.executable, "-m", "colax.plan", "--config", "configs/cola_60m.py",
                          "--config.model.bogus=1"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: --config.model.bogus: no such config key")
    assert "Traceback" not in out.stderr


def test_cli_usage_errors_are_one_line():
    # Issue 33, item 6: absl printed 31 lines of usage text and exited with 1.
    out = subprocess.run([sys.executable, "-m", "colax.plan", "--config", "configs/cola_60m.py", "--remat", "bogus"],
                         capture_output=True, text=True)
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr.startswith("error: --remat: unknown policy 'bogus' (known: ") and out.stderr.count("\n") == 1


@pytest.mark.parametrize("kind", ["cola", "llama"])
def test_paper_presets_train_on_c4_with_the_t5_tokenizer(kind):
    for size in ("60m", "350m", "7b"):
        d = config.preset(kind, size).data
        assert (d.source, d.hf_name, d.hf_config, d.tokenizer) == (
            "hf", "allenai/c4", "en", "https://huggingface.co/google-t5/t5-base/resolve/main/spiece.model")
        assert config.preset(kind, size).model.vocab_size == 32000  # T5's pieces
    assert config.preset(kind, "tiny").data.source == "stdlib" and config.preset(kind, "tiny").data.tokenizer == ""


def test_fit_warmup_cuts_a_warmup_longer_than_the_run():
    c = config.preset("cola", "350m")
    c.train.steps = 30
    fitted, notice = config.fit_warmup(c)
    assert fitted.optim.warmup_steps == 3 and c.optim.warmup_steps == 6000  # a copy
    assert notice == ("notice: optim.warmup_steps=6000 is not shorter than train.steps=30: "
                      "warming up over 3 steps (10% of the run)")
    config.validate(fitted)
    c.train.steps = 6001
    assert config.fit_warmup(c) == (c, None)


def test_smoke_shrinks_batches_and_evaluation_only():
    c = config.preset("cola", "350m")
    s = config.smoke(c)
    t = s.train
    assert (t.steps, t.batch_size, t.micro_batch_size, t.eval_every, t.eval_batches, t.baseline_batches,
            t.checkpoint_every, t.sample_tokens, s.data.hf_shuffle_buffer) == (3, 1, 1, 0, 1, 0, 3, 16, 100)
    assert s.model == c.model and (s.data.source, s.data.tokenizer) == (c.data.source, c.data.tokenizer)
    assert c.train.batch_size == 512  # a copy
    config.validate(config.fit_warmup(s)[0])
    assert config.smoke(c, 7).train.steps == 7


class Scaled(dense.Dense):
    """A made-up kind, `y = scale * x @ W`: its key, check, preset and sizes live on the class only."""

    config = dict(scaled_factor=0.5)
    preset_sizes = ("tiny",)

    def __init__(self, in_features, out_features, rank, cfg, *, rngs):
        super().__init__(in_features, out_features, rank, cfg, rngs=rngs)
        self.factor = cfg.scaled_factor

    def __call__(self, x):
        return self.factor * super().__call__(x)

    @staticmethod
    def check_config(m, require, selected):
        require(0 < m.scaled_factor < 1 or not selected, "scaled_factor", "must be in (0, 1)", m.scaled_factor)

    @staticmethod
    def preset(cfg, size, paper):
        cfg.optim.lr = paper["lr"] / 2


def test_a_new_kind_brings_its_config_key_check_and_preset(monkeypatch):
    monkeypatch.setitem(projections.PROJECTIONS, "scaled", Scaled)
    assert model.defaults().scaled_factor == 0.5 and config.defaults().model.scaled_factor == 0.5
    cfg = config.preset("scaled", "tiny")
    assert (cfg.model.projection, cfg.optim.lr) == ("scaled", config.SIZES["tiny"][5] / 2)
    with pytest.raises(ConfigError, match=r"^no preset scaled_60m: .*\(scaled: tiny\)"):
        config.preset("scaled", "60m")
    spec = config.validate(cfg)
    assert spec.scaled_factor == 0.5 and spec.replace(scaled_factor=0.25).scaled_factor == 0.25
    assert model.abstract_model(spec.replace(scaled_factor=0.25)).blocks.q.factor == 0.25  # the block's cfg has it
    cfg.model.scaled_factor = 1.5
    with pytest.raises(ConfigError, match=r"^model.scaled_factor must be in \(0, 1\), got 1.5$"):
        config.validate(cfg)
    cfg.model.projection = "cola"  # checked with `selected` False: another kind's key is not this one's business
    assert config.validate(cfg).scaled_factor == 1.5


def test_kinds_that_share_a_key_share_its_default():
    defaults = model.defaults()
    declared = [(key, value) for kind in projections.PROJECTIONS.values()
                for key, value in getattr(kind, "config", {}).items()]
    assert {key for key, _ in declared} == {"lora_alpha", "lora_dropout", "relora_a_init", "sparse_density", "switch_interval",
                                            "switch_descent", "switch_hold_steps", "sst_round_iterations"}
    assert [(key, defaults[key]) for key, _ in declared] == declared


def test_spec_options_are_read_and_replaced_like_fields(spec):
    assert (spec.lora_alpha, spec.sst_round_iterations) == (32.0, 8)
    changed = spec.replace(lora_alpha=2.0, num_layers=3)
    assert (changed.lora_alpha, changed.num_layers, changed.sparse_density) == (2.0, 3, spec.sparse_density)
    with pytest.raises(AttributeError, match="no_such_option"):
        spec.no_such_option  # pylint: disable=pointless-statement
