"""The config schema, the paper's presets, and validation with one-line errors.

A config is an `ml_collections.ConfigDict` with sections `model`, `data`, `optim` and `train`,
each owned by its module (`colax.model.defaults()`, ...). Config files under configs/ return
`preset(kind, size)` with any changes; `--config.a.b=v` overrides work on top of them.
"""

import importlib.util
import os

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from colax import data_config, errors, model, optim, projections, sharding, tokenizer
from colax.errors import ConfigError

# The paper's model sizes: hidden, intermediate, heads, layers, rank, CoLA peak lr, steps, warmup,
# only_lr_act (CoLA's lr and only_lr_act: a projection kind's `preset` may take them). "tiny" is the CPU demo size.
SIZES = {
    "tiny": (128, 344, 4, 2, 32, 0.003, 300, 30, False),
    "60m": (512, 1376, 8, 8, 128, 0.006, 10_000, 2_000, False),
    "130m": (768, 2048, 12, 12, 256, 0.003, 20_000, 2_000, False),
    "350m": (1024, 2736, 16, 24, 256, 0.003, 60_000, 6_000, True),
    "1b": (2048, 5461, 32, 24, 512, 0.002, 100_000, 10_000, True),
    "7b": (4096, 11008, 32, 32, 1024, 0.001, 150_000, 15_000, True),
}
# The reference code ships no full-rank recipe: the usual peak lr for these LLaMA baselines.
FULL_RANK_LR = 0.001
# GaLore / Fira on the full-rank model, their authors' scripts (jiaweizzhao/GaLore@2cc66f8
# scripts/benchmark_c4/llama_<size>.sh; xichen-fy/Fira@5c28b13 pre_training_c4/scripts/llama_<size>.sh):
# peak lr, scale (Fira's --alpha), T = 200 steps between projector refreshes, no weight decay, no
# clipping (their default), 10% warmup, their AdamW's eps; rank = the size's rank, except as in
# LOW_RANK_SIZES, where a script differs from those.
LOW_RANK_OPTIM = dict(lr=0.01, scale=0.25, update_proj_gap=200, weight_decay=0.0, grad_clip=0.0, eps=1e-6)
LOW_RANK_SIZES = {
    ("galore", "1b"): dict(rank=1024),
    ("fira", "1b"): dict(scale=0.0625),
    ("galore", "7b"): dict(lr=0.005, update_proj_gap=500, grad_clip=1.0),
    # Fira's 7B script also trains 10k steps (1k warmup): the preset keeps the size's schedule.
    ("fira", "7b"): dict(rank=64, lr=0.005, scale=0.0625, update_proj_gap=500, grad_clip=1.0),
}
# Presets that are not a projection kind's own: {preset name: the projection kind it trains}. The
# full-rank model ("dense") is "llama", and "galore" and "fira" when trained by GaLore or Fira
# (`LOW_RANK_OPTIM`). "relora" is ReLoRA (Lialin et al.): LoRA (`LoRA.preset`) on the full-rank model's
# sizes with the size's rank, in the proportions of the authors' README 250M recipe (Guitaricet/relora
# README.md:52-88, 20k steps: a 5k-step warm start at lr 5e-4 with warmup 1k, then lr 1e-3 (the
# full-rank lr) with warmup 500, a merge every 5k steps, 100-step re-warmups (fewer for short runs),
# optimizer state fully reset at merges). Steps, batch and tokens: those of every method in compare.py.
VARIANTS = {"llama": "dense", "galore": "dense", "fira": "dense", "relora": "lora"}
RELORA_WARM_START_LR = 5e-4


def train_defaults():
    """The `config.train` section."""
    return ml_collections.ConfigDict(dict(
        steps=10_000,           # optimizer steps
        batch_size=512,         # sequences per optimizer step (global)
        micro_batch_size=32,    # sequences per device per forward/backward (gradient accumulation)
        seed=0,                 # parameter initialisation (and sampling)
        init_from="",           # a new run starts from these parameters: a colax workdir or safetensors
        log_every=10,           # steps between metrics.jsonl lines
        eval_every=1000,        # steps between validation passes (0: only at the end)
        eval_batches=50,        # validation batches of micro_batch_size x data-parallel rows (0: whole split)
        final_eval_tokens=10_000_000,  # the end-of-run pass reads the split up to this many tokens (0: all)
        baseline_batches=200,   # train batches counted for the unigram perplexity baseline (0: none)
        checkpoint_every=1000,  # steps between (async) checkpoints; one is always saved at the end
        keep_checkpoints=3,     # checkpoints kept (the newest)
        on_nonfinite="stop",    # non-finite loss/gradients/parameters: "stop" the run or "skip" the update
        max_skipped_steps=10,   # "skip": stop after more non-finite steps than this in a row
        spike_nats=1.0,         # stop when the loss exceeds its running median by more than this (0: off)
        spike_window=20,        # steps in that running median (fewer until it is full; refilled on resume)
        resume_step=0,          # resume from this kept checkpoint instead of the newest (0: newest)
        sample_prompt="def ",   # generated from at the end of training ("" : no sample)
        sample_tokens=64,       # tokens generated (prompt + sample at most data.seq_len)
        sample_temperature=0.0, # 0: greedy
    ))


def defaults():
    """The full schema with default values: every key a config may set."""
    return ml_collections.ConfigDict(dict(
        model=model.defaults(), data=data_config.defaults(), optim=optim.defaults(), train=train_defaults(),
        mesh=sharding.defaults()))


# The paper's data (all sizes but "tiny"): C4 en streamed from the Hugging Face Hub, as the reference
# code reads it, tokenized with T5's SentencePiece model (downloaded into the workdir on first use).
# Offline, C4 prepared as TFDS array_record is the alternative (docs/data.md).
PAPER_DATA = dict(source="hf", hf_name="allenai/c4", hf_config="en", tokenizer=tokenizer.T5_URL)


def preset(kind, size, pure_bf16=False):
    """The paper's config for `kind` at `size`: model, optimizer, steps and (PAPER_DATA) data; "tiny"
    keeps the demo data of `colax.data_config.defaults()`. `pure_bf16`: the authors' pure-bf16 run (their
    scripts' `--dtype bfloat16`, e.g. SwitchLoRA's llama/main.py:109,426-427): parameters, and with
    them SwitchLoRA's candidate pools, in bfloat16 (`model.param_dtype`; Adam's moments stay float32,
    `optim.scale_by_adam`).

    `kind` is a projection kind but "dense" (`projections.PROJECTIONS`) or a `VARIANTS` name. Every
    preset starts from the size's model and rank with the full-rank lr (`FULL_RANK_LR`) and the size's
    schedule; the projection kind's `preset(cfg, size, paper)` then makes its own changes (paper: the
    size's CoLA recipe, {"lr", "only_lr_act"}), e.g. CoLA and CR-Net take CoLA's lr, SLTrain its own
    alpha, lr and no weight decay. A kind with `preset_sizes` has presets at those sizes only.
    "galore" and "fira" are the full-rank model trained with that optimizer (`LOW_RANK_OPTIM`), "relora"
    LoRA with ReLoRA's schedule."""
    kinds = tuple(k for k in projections.PROJECTIONS if k != "dense") + tuple(VARIANTS)
    projection = VARIANTS.get(kind, kind)
    limited = {k: v.preset_sizes for k, v in projections.PROJECTIONS.items() if hasattr(v, "preset_sizes")}
    if kind not in kinds or size not in SIZES or size not in limited.get(projection, SIZES):
        raise ConfigError(f"no preset {kind}_{size}: kinds {', '.join(kinds)}; sizes {', '.join(SIZES)} "
                          + " ".join(f"({k}: {', '.join(v)})" for k, v in limited.items()))
    d, f, heads, n_layers, rank, lr, steps, warmup, only_lr_act = SIZES[size]
    cfg = defaults()
    cfg.model.update(projection=projection, hidden_size=d, intermediate_size=f,
                     num_heads=heads, num_layers=n_layers, rank=rank, only_lr_act=False)
    cfg.optim.update(lr=FULL_RANK_LR, warmup_steps=warmup)
    cfg.train.steps = steps
    if size != "tiny":
        cfg.data.update(PAPER_DATA)
    kind_class = projections.PROJECTIONS[projection]
    if hasattr(kind_class, "preset"):
        kind_class.preset(cfg, size, dict(lr=lr, only_lr_act=only_lr_act))
    if kind in ("galore", "fira"):
        cfg.optim.update(name=kind, rank=rank, warmup_steps=steps // 10, **LOW_RANK_OPTIM)
        cfg.optim.update(LOW_RANK_SIZES.get((kind, size), {}))
    if kind == "relora":
        cfg.optim.update(schedule="jagged_cosine", full_rank_steps=steps // 4, restart_every=steps // 4,
                         restart_warmup_steps=min(100, steps // 16), warmup_steps=steps // 40,
                         full_rank_lr=RELORA_WARM_START_LR, full_rank_warmup_steps=steps // 20)
    if pure_bf16:
        cfg.model.update(dtype="bfloat16", param_dtype="bfloat16")
    return cfg


def fit_warmup(cfg):
    """(cfg, notice): a warmup as long as the run or longer (a short run of a paper config, e.g.
    `--config.train.steps=3`) cut to 10% of `train.steps` in a copy of `cfg`, with the one-line notice
    saying so; else (cfg, None)."""
    steps, warmup = cfg.train.steps, cfg.optim.warmup_steps
    if not (isinstance(steps, int) and isinstance(warmup, int) and 1 <= steps <= warmup):
        return cfg, None
    cfg = cfg.copy_and_resolve_references()
    cfg.optim.warmup_steps = steps // 10
    return cfg, (f"notice: optim.warmup_steps={warmup} is not shorter than train.steps={steps}: "
                 f"warming up over {cfg.optim.warmup_steps} steps (10% of the run)")


SMOKE_STEPS = 3


def smoke(cfg, steps=SMOKE_STEPS):
    """`train.py --smoke`: a copy of `cfg` shrunk to a quick end-to-end check of its model, data and
    tokenizer: `steps` steps of one sequence per data-parallel device, one validation batch and a
    checkpoint at the end, one final validation batch, no unigram baseline, a sample of at most 16 tokens, the first batch after
    at most 100 streamed documents (data.hf_shuffle_buffer)."""
    cfg = cfg.copy_and_resolve_references()
    data_size, fsdp, _ = sharding.mesh_shape(cfg.mesh, jax.device_count())
    cfg.train.update(steps=steps, batch_size=data_size * fsdp, micro_batch_size=1, log_every=1, eval_every=0,
                     eval_batches=1, final_eval_tokens=1, baseline_batches=0, checkpoint_every=steps,
                     sample_tokens=min(cfg.train.sample_tokens, 16))
    cfg.data.hf_shuffle_buffer = min(cfg.data.hf_shuffle_buffer, 100)
    return cfg


def from_file(path):
    """The ConfigDict that `get_config()` of a config file (e.g. configs/tiny.py) returns, as
    `--config path` loads it."""
    module_spec = importlib.util.spec_from_file_location("colax_config_file", path)
    if module_spec is None:
        raise ConfigError(f"config file {path} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        return module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # pylint: disable=broad-except
        raise errors.config_file_error(path, e) from None


def from_flag(holder):
    """The ConfigDict of a `config_flags.DEFINE_config_file` flag (its file is loaded on first use),
    or a one-line ConfigError naming the file."""
    path = config_flags.get_config_filename(flags.FLAGS[holder.name])
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path}: no such file")
    try:
        cfg = holder.value
        cfg.keys()  # a file that failed to load is a placeholder that raises on first use
        return cfg
    except ConfigError:
        raise
    except Exception as e:  # pylint: disable=broad-except
        raise errors.config_file_error(path, e) from None


def check_keys(cfg, schema=None, prefix=""):
    """Raises ConfigError naming the first key of `cfg` that the schema does not have."""
    schema = defaults() if schema is None else schema
    for key, value in cfg.items():
        name = prefix + key
        if key not in schema:
            raise ConfigError(f"unknown config key {name} (known here: {', '.join(schema)})")
        if isinstance(value, ml_collections.ConfigDict) != isinstance(schema[key], ml_collections.ConfigDict):
            raise ConfigError(f"config key {name} must {'' if isinstance(schema[key], ml_collections.ConfigDict) else 'not '}be a section")
        if isinstance(value, ml_collections.ConfigDict):
            check_keys(value, schema[key], name + ".")


# The integer fields of `train` and their smallest allowed value.
_TRAIN_MINIMUM = dict(steps=1, batch_size=1, micro_batch_size=1, log_every=1, keep_checkpoints=1,
                      checkpoint_every=1, eval_every=0, eval_batches=0, final_eval_tokens=0, baseline_batches=0, sample_tokens=0,
                      max_skipped_steps=0, spike_window=1, resume_step=0)


def validate(cfg, num_devices=None):
    """Checks the whole config for a run on `num_devices` devices (default: this run's,
    `jax.device_count()`); returns the ModelSpec. Raises ConfigError naming the bad field."""
    check_keys(cfg)
    sharding.mesh_shape(cfg.mesh, num_devices or jax.device_count())
    spec = model.spec_from_config(cfg.model)
    data_config.validate(cfg.data)
    t = cfg.train
    for field, low in _TRAIN_MINIMUM.items():
        if not (isinstance(t[field], int) and t[field] >= low):
            raise ConfigError(f"train.{field} must be {'a positive integer' if low else 'an integer >= 0'}, "
                              f"got {t[field]!r}")
    if t.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.on_nonfinite must be 'stop' or 'skip', got {t.on_nonfinite!r}")
    if not (isinstance(t.spike_nats, (int, float)) and t.spike_nats >= 0):
        raise ConfigError(f"train.spike_nats must be a number of nats >= 0 (0: off), got {t.spike_nats!r}")
    if t.sample_temperature < 0:
        raise ConfigError(f"train.sample_temperature must be >= 0, got {t.sample_temperature!r}")
    accum_steps(cfg, num_devices)
    optim.validate(cfg.optim, t.steps)
    optim.check_model(cfg.optim, spec)
    kind = projections.PROJECTIONS[spec.projection]
    if getattr(kind, "needs_restarts", False) and not (cfg.optim.schedule == "jagged_cosine" and cfg.optim.restart_every):
        raise ConfigError(f"optim.schedule must be 'jagged_cosine' with optim.restart_every > 0 for model.projection="
                          f"{spec.projection!r} (its iterations), got {cfg.optim.schedule!r}, {cfg.optim.restart_every}")
    if cfg.optim.full_rank_steps and not hasattr(kind, "full_rank_frozen"):
        raise ConfigError(f"optim.full_rank_steps needs a projection kind with a full-rank warm start (lora), "
                          f"got model.projection={spec.projection!r}")
    if spec.relora_a_init == "zeros" and cfg.optim.schedule != "jagged_cosine":
        raise ConfigError(f"model.relora_a_init 'zeros' needs optim.schedule='jagged_cosine' (without ReLoRA's "
                          f"merges, which re-draw A, A and B stay 0), got {cfg.optim.schedule!r}")
    return spec


def accum_steps(cfg, num_devices=None):
    """Micro-batches per optimizer step: batch_size / (micro_batch_size * data-parallel devices), on
    `num_devices` devices (default: all of this run's, `jax.device_count()`)."""
    data_size, fsdp, _ = sharding.mesh_shape(cfg.mesh, num_devices or jax.device_count())
    rows = cfg.train.micro_batch_size * data_size * fsdp
    if cfg.train.batch_size % rows:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by "
                          f"train.micro_batch_size * data-parallel devices = {rows}")
    return cfg.train.batch_size // rows
