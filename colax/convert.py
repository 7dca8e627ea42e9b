"""Model weights to and from safetensors: colax's own layout, the CoLA authors' and Hugging Face LLaMA's.

  python -m colax.convert export --workdir RUN --out DIR [--step N] [--format auto|colax|cola|llama]
  python -m colax.convert import SRC --workdir DIR [--config configs/x.py [--config.a.b=v ...]] [--overwrite]

A layout names every parameter of a `Transformer` (a pure dict: `embed` [V, D], `lm_head` [D, V],
`final_norm.weight` [D], `blocks.<name>.<leaf>` [L, ...] stacked over layers) as safetensors keys:

- `colax`: any projection kind; keys are the parameter paths (`blocks.q.A`), arrays as stored, and
  config.json holds the model section. Export then import is the identity for every kind.
- `cola`: the CoLA authors' Hugging Face style checkpoint (`model_type: "cola"`), one key per layer,
  `.cola_a` [in, r] and `.cola_b` [r, out] in the `x @ A` layout.
- `cola_m` (import only): the authors' CoLA-M checkpoint, the same factors under other names, with
  layer i's down B held by layer i + 1.
- `llama`: full-rank models as Hugging Face `LlamaForCausalLM` (`.weight` [out, in]).

Files: `model.safetensors`, or `model-0000i-of-0000n.safetensors` plus
`model.safetensors.index.json` past `--max_shard_mb`, and `config.json`; import takes that
directory or one safetensors file (config.json beside it). Import writes a colax workdir (config.json
and a step-0 checkpoint of the parameters; as train.py, under the workdir's lock, every check before
the first write), which `colax.evaluate`, `colax.generate` and
`train.py --config.train.init_from=DIR` read. docs/inference.md#convert has the details.
"""

from colax import errors

if __name__ == "__main__":  # Ctrl-C while the imports below load: one line, exit 130
    errors.exit_on_signal("interrupted")

import dataclasses  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, for safetensors)
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402
from flax import nnx, traverse_util  # noqa: E402
from safetensors import numpy as st_numpy  # noqa: E402
from safetensors import SafetensorError, safe_open  # noqa: E402

from colax import checkpoint, model, sharding, tokenizer  # noqa: E402
from colax import config as config_lib  # noqa: E402
from colax import run as run_lib  # noqa: E402
from colax import workdir as workdir_lib  # noqa: E402
from colax.errors import ConfigError, DataError, exit_on_error, parse_flags, quiet_library_logs  # noqa: E402
from colax.projections.common import PROJECTION_NAMES  # noqa: E402

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Model fields that do not change what given parameters compute (import keeps the config's).
FREE_MODEL_FIELDS = ("init_std", "scan_layers", "remat", "dtype", "param_dtype", "attention_impl", "kernel")
# Module of each projection inside a Hugging Face LLaMA layer.
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
# CoLA-M: the module holding each CoLA factor of layer i (down B: see _cola_m_key).
COLA_M_MODULES = {
    **{(p, "A"): f"pre_attn.pre_{p}_proj" for p in ("q", "k", "v")},
    **{(p, "B"): f"self_attn.post_{p}_proj" for p in ("q", "k", "v")},
    ("o", "A"): "self_attn.pre_o_proj", ("o", "B"): "post_attn.post_o_proj",
    **{(p, "A"): f"pre_mlp.pre_{p}_proj" for p in ("gate", "up")},
    **{(p, "B"): f"self_mlp.post_{p}_proj" for p in ("gate", "up")},
    ("down", "A"): "self_mlp.pre_down_proj"}
# Where some CoLA-M checkpoints may keep the last layer's down B: the model's, not the layer's, post_mlp.
COLA_M_TOP_DOWN_B = "model.post_mlp.post_down_proj.cola_b"


def _cola_key(name, leaf, i, num_layers):
    del num_layers
    return f"model.layers.{i}.{HF_MODULES[name]}.cola_{leaf.lower()}"


def _cola_m_key(name, leaf, i, num_layers):
    if (name, leaf) == ("down", "B"):
        if i + 1 < num_layers:
            return f"model.layers.{i + 1}.last_layer_post_mlp.post_down_proj.cola_b"
        return f"model.layers.{i}.post_mlp.post_down_proj.cola_b"
    return f"model.layers.{i}.{COLA_M_MODULES[name, leaf]}.cola_{leaf.lower()}"


def _llama_key(name, leaf, i, num_layers):
    del leaf, num_layers
    return f"model.layers.{i}.{HF_MODULES[name]}.weight"


@dataclasses.dataclass(frozen=True)
class Layout:
    """A Hugging Face style naming of one projection kind's parameters, one key per layer.

    key(projection name, leaf, layer, num_layers) -> safetensors key of that layer's leaf;
    `transpose`: projection matrices are stored [out, in] (torch Linear) instead of [in, out].
    """
    projection: str
    key: object
    transpose: bool


LAYOUTS = {"cola": Layout("cola", _cola_key, False), "cola_m": Layout("cola", _cola_m_key, False),
           "llama": Layout("dense", _llama_key, True)}
EXPORT_FORMATS = ("colax", "cola", "llama")


def _entries(layout, params):
    """[(parameter path, layer or None, key, transpose)] naming every parameter of `params` in `layout`."""
    num_layers = params["blocks"]["attn_norm"]["weight"].shape[0]
    out = [(("embed",), None, "model.embed_tokens.weight", False), (("lm_head",), None, "lm_head.weight", True),
           (("final_norm", "weight"), None, "model.norm.weight", False)]
    for i in range(num_layers):
        out += [(("blocks", "attn_norm", "weight"), i, f"model.layers.{i}.input_layernorm.weight", False),
                (("blocks", "mlp_norm", "weight"), i, f"model.layers.{i}.post_attention_layernorm.weight", False)]
        for name in PROJECTION_NAMES:
            for leaf in params["blocks"][name]:
                out.append((("blocks", name, leaf), i, layout.key(name, leaf, i, num_layers), layout.transpose))
    return out


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def to_tensors(params, fmt):
    """Params (nested dict of arrays) -> {safetensors key: contiguous numpy array} in format `fmt`."""
    params = jax.device_get(params)
    if fmt == "colax":
        return {key: np.asarray(leaf) for key, leaf in traverse_util.flatten_dict(params, sep=".").items()}
    out = {}
    for path, layer, key, transpose in _entries(LAYOUTS[fmt], params):
        array = np.asarray(_get(params, path))
        array = array if layer is None else array[layer]
        out[key] = np.ascontiguousarray(array.T if transpose else array)
    return out


def from_tensors(tensors, fmt, abstract, where):
    """{key: array} in format `fmt` -> params shaped like `abstract` (nested dict of ShapeDtypeStructs).

    Every key must be there with the expected shape and none other: DataError naming the key (and
    both shapes). Arrays are cast to the abstract dtypes.
    """
    if fmt == "colax":
        expected = traverse_util.flatten_dict(abstract, sep=".")
        checkpoint.check_shapes(expected, tensors, where)
        return _unflatten({tuple(k.split(".")): np.asarray(v, expected[k].dtype) for k, v in tensors.items()})
    entries = _entries(LAYOUTS[fmt], abstract)
    expected = {}
    for path, layer, key, transpose in entries:
        shape = _get(abstract, path).shape[0 if layer is None else 1:]
        expected[key] = jax.ShapeDtypeStruct(shape[::-1] if transpose else shape, np.float32)
    checkpoint.check_shapes(expected, tensors, where)
    stacks = {}
    for path, layer, key, transpose in entries:
        array = np.asarray(tensors[key], _get(abstract, path).dtype)
        stacks.setdefault(path, []).append(array.T if transpose else array)
    return _unflatten({path: arrays[0] if path[0] != "blocks" else np.stack(arrays)
                       for path, arrays in stacks.items()})


def _unflatten(flat):
    """{path tuple: leaf} -> nested dict."""
    out = {}
    for path, leaf in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return out


def abstract_params(cfg_model):
    """The model's parameters as ShapeDtypeStructs (nested pure dict) for a `config.model` section."""
    spec = model.spec_from_config(cfg_model)
    return nnx.to_pure_dict(nnx.state(model.abstract_model(spec)))


# ---------------------------------------------------------------------------------------------
# config.json


def hf_config(cfg, fmt, tok=None):
    """The config.json dict of a model exported in `fmt` (token ids from `tok` when given)."""
    m = cfg.model
    if fmt == "colax":
        return dict(model_type="colax", model=json.loads(m.to_json_best_effort()))
    ids = dict(bos_token_id=None, eos_token_id=None, pad_token_id=m.pad_id)
    if tok is not None:
        ids.update(bos_token_id=tok.bos_id if tok.bos_id >= 0 else None, eos_token_id=tok.eos_id)
    out = dict(
        architectures=["ColaForCausalLM" if fmt == "cola" else "LlamaForCausalLM"], model_type=fmt,
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_attention_heads=m.num_heads, num_key_value_heads=m.num_heads, head_dim=m.hidden_size // m.num_heads,
        num_hidden_layers=m.num_layers, hidden_act="silu", rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
        rope_scaling=None, max_position_embeddings=cfg.data.seq_len, initializer_range=m.init_std,
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False, torch_dtype=m.param_dtype, **ids)
    if fmt == "cola":
        out.update(rank=m.rank, only_lr_act=m.only_lr_act)
        if any(m.ranks[n] for n in PROJECTION_NAMES):
            out["ranks"] = {n: m.ranks[n] or m.rank for n in PROJECTION_NAMES}
    return out


# Optional config.json keys colax cannot honour unless they have these values.
_HF_CHECKS = (("hidden_act", lambda v, c: v == "silu", "must be 'silu'"),
              ("num_key_value_heads", lambda v, c: v == c.get("num_attention_heads"),
               "must equal num_attention_heads (colax has no grouped-query attention)"),
              ("tie_word_embeddings", lambda v, c: not v, "must be false (colax's lm_head is untied)"),
              ("rope_scaling", lambda v, c: v is None, "is not supported (plain RoPE only)"),
              ("rope_parameters", lambda v, c: v.get("rope_type", "default") == "default",
               "must have rope_type 'default' (plain RoPE only)"))


def _need(conf, key, where):
    if key not in conf:
        raise DataError(f"{where}: {key} is missing")
    return conf[key]


def _pad_id(pad_token_id):
    """config.json's pad_token_id as `model.pad_id`: null or negative (GaLore-family configs set -1,
    meaning no pad token) is None."""
    return None if pad_token_id is None or pad_token_id < 0 else pad_token_id


def model_fields(conf, where):
    """The `config.model` fields that config.json dict `conf` sets (DataError if it cannot be read)."""
    model_type = conf.get("model_type")
    if model_type == "colax":
        return {k: v for k, v in _need(conf, "model", where).items() if k not in FREE_MODEL_FIELDS}
    if model_type not in ("cola", "cola_m", "llama"):
        raise DataError(f"{where}: unknown model_type {model_type!r} (known: colax, cola, cola_m, llama)")
    for key, ok, msg in _HF_CHECKS:
        if key in conf and not ok(conf[key], conf):
            raise DataError(f"{where}: {key} {msg}, got {conf[key]!r}")
    rope = conf.get("rope_parameters") or {}
    fields = dict(
        projection=LAYOUTS[model_type].projection, vocab_size=_need(conf, "vocab_size", where),
        hidden_size=_need(conf, "hidden_size", where), intermediate_size=_need(conf, "intermediate_size", where),
        num_heads=_need(conf, "num_attention_heads", where), num_layers=_need(conf, "num_hidden_layers", where),
        rope_theta=float(conf.get("rope_theta", rope.get("rope_theta", 10000.0))),
        norm_eps=float(conf.get("rms_norm_eps", 1e-6)), pad_id=_pad_id(conf.get("pad_token_id")),
        only_lr_act=bool(conf.get("only_lr_act", False)))
    if model_type != "llama":
        fields["rank"] = _need(conf, "rank", where)
        fields["ranks"] = {n: conf.get("ranks", {}).get(n, 0) for n in PROJECTION_NAMES}
    return fields


# ---------------------------------------------------------------------------------------------
# Files


def _weight_files(path):
    """(directory, [safetensors files]) of a safetensors file or of a directory holding the weights."""
    path = epath.Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_file():
        return path.parent, [path]
    if (path / INDEX_NAME).exists():
        weight_map = _read_json(path / INDEX_NAME).get("weight_map", {})
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f for f in files if not f.exists()]
        if missing or not files:
            raise DataError(f"{path / INDEX_NAME}: names {missing[0] if missing else 'no'} shard file")
        return path, files
    if (path / WEIGHTS_NAME).exists():
        return path, [path / WEIGHTS_NAME]
    raise DataError(f"{path}: holds neither {WEIGHTS_NAME} nor {INDEX_NAME}")


def read_tensors(files):
    """{key: numpy array} of safetensors files (a key found in two files is a DataError)."""
    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="np") as handle:
                for key in handle.keys():
                    if key in out:
                        raise DataError(f"{f}: key {key} is also in another shard")
                    out[key] = handle.get_tensor(key)
        except (SafetensorError, TypeError) as e:  # TypeError: a dtype numpy does not know
            raise DataError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    return out


def _read_json(path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def read(path, cfg_model=None):
    """(model fields, params) of the checkpoint at `path` (directory or safetensors file).

    params: nested dict of numpy arrays in the model's `param_dtype` (that of `cfg_model`, whose
    other fields the checkpoint's config.json overrides; default: `model.defaults()`).
    """
    directory, files = _weight_files(path)
    conf_path = directory / CONFIG_NAME
    if not conf_path.exists():
        raise DataError(f"{conf_path}: no such file (the weights need their config.json)")
    conf = _read_json(conf_path)
    fields = model_fields(conf, str(conf_path))
    m = ml_collections.ConfigDict(cfg_model or model.defaults())
    try:
        m.update(fields)
        abstract = abstract_params(m)
    except (ConfigError, TypeError, AttributeError, KeyError) as e:
        raise DataError(f"{conf_path}: not a valid colax model ({str(e).splitlines()[0]})") from None
    tensors = read_tensors(files)
    fmt = conf["model_type"]
    if fmt == "cola" and any(".pre_attn." in k for k in tensors):
        fmt = "cola_m"
    if fmt == "cola_m" and COLA_M_TOP_DOWN_B in tensors:  # the last down B stored beside the layers
        last = fields["num_layers"] - 1
        tensors[_cola_m_key("down", "B", last, last + 1)] = tensors.pop(COLA_M_TOP_DOWN_B)
    return fields, from_tensors(tensors, fmt, abstract, str(path))


def write_tensors(tensors, out, max_shard_bytes):
    """Writes {key: array} as out/model.safetensors, or as shards of at most `max_shard_bytes` + index."""
    shards, size = [[]], 0
    for key, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += array.nbytes
    names = ([WEIGHTS_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, keys in zip(names, shards):
        st_numpy.save_file({k: tensors[k] for k in keys}, str(out / name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = dict(metadata=dict(total_size=sum(a.nbytes for a in tensors.values())),
                     weight_map={k: name for name, keys in zip(names, shards) for k in keys})
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def export(cfg, params, out, fmt="auto", tok=None, max_shard_bytes=5 * 10**9):
    """Writes `params` of the model of `cfg` to directory `out` (config.json + safetensors)."""
    projection = cfg.model.projection
    if fmt == "auto":
        fmt = next((f for f in ("cola", "llama") if LAYOUTS[f].projection == projection), "colax")
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format must be auto or one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    if fmt != "colax" and LAYOUTS[fmt].projection != projection:
        raise ConfigError(f"projection kind {projection!r} has no {fmt!r} layout (it holds "
                          f"{LAYOUTS[fmt].projection!r} models); use --format colax")
    out = epath.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / INDEX_NAME]:  # an earlier export's files
        if stale.exists():
            stale.unlink()
    write_tensors(to_tensors(params, fmt), out, max_shard_bytes)
    (out / CONFIG_NAME).write_text(json.dumps(hf_config(cfg, fmt, tok), indent=2) + "\n")
    return fmt


# ---------------------------------------------------------------------------------------------
# Commands and train.init_from


def _local(cfg):
    """`cfg` with the default mesh (all local devices on the data axis), to read a run anywhere."""
    cfg = ml_collections.ConfigDict(cfg)
    cfg.mesh = sharding.defaults()
    return cfg


def export_run(workdir, out, step=None, fmt="auto", max_shard_bytes=5 * 10**9):
    """Exports checkpoint `step` (default: newest) of the run in `workdir`; returns the format used.

    The run's tokenizer (workdir/tokenizer.model or data.tokenizer) is copied beside the weights
    and gives config.json its bos/eos ids.
    """
    cfg = _local(run_lib.load_config(workdir))
    _, params = checkpoint.load_params(cfg, workdir, step)
    tok_path = cfg.data.tokenizer or str(epath.Path(workdir) / tokenizer.MODEL_NAME)
    tok = tokenizer.load_tokenizer(tok_path) if epath.Path(tok_path).exists() else None
    fmt = export(cfg, params, out, fmt, tok, max_shard_bytes)
    if tok is not None:
        shutil.copyfile(tok_path, epath.Path(out) / tokenizer.MODEL_NAME)
    return fmt


def import_run(src, workdir, cfg=None, overwrite=False):
    """Writes the checkpoint at `src` as a colax workdir: config.json (`cfg`, default
    `config.defaults()`, with the checkpoint's model fields) and a step-0 checkpoint of the parameters.

    As train.py: the workdir's lock first (ConfigError naming the holder while a run or another
    import has it), then every check, then the writes; a refused import changes no byte. A workdir
    that holds checkpoints is replaced only with `overwrite` (all of its run's files). A
    tokenizer.model beside the weights is copied into the workdir. Returns the config.
    """
    cfg = ml_collections.ConfigDict(config_lib.defaults() if cfg is None else cfg)
    with workdir_lib.lock(workdir, command="convert import"):
        fields, params = read(src, cfg.model)
        cfg.model.update(fields)
        config_lib.validate(cfg)
        _, replace = run_lib.check_workdir(workdir, cfg, overwrite)
        ckpt_dir = checkpoint.directory(workdir)
        if ckpt_dir.exists() and any(ckpt_dir.iterdir()) and not overwrite:
            raise ConfigError(f"workdir {workdir} already holds checkpoints; pass --overwrite to replace them")
        checkpoint.check_writable(ckpt_dir)
        run_lib.write_workdir(workdir, cfg, replace or overwrite)
        tok_src = _weight_files(src)[0] / tokenizer.MODEL_NAME
        if tok_src.exists() and not cfg.data.tokenizer:
            shutil.copyfile(tok_src, epath.Path(workdir) / tokenizer.MODEL_NAME)
        checkpoint.save_params(workdir, 0, params)
    return cfg


def init_params(cfg, params, source):
    """The parameters at `source` (`train.init_from`), placed like `params` (freshly initialised ones).

    source is a colax workdir (its newest checkpoint) or a safetensors file/directory; its model
    fields (config.json) must equal `cfg.model`'s, except those in FREE_MODEL_FIELDS: ConfigError
    naming the first that differs.
    """
    is_run = (epath.Path(source) / run_lib.CONFIG_NAME).exists() and (epath.Path(source) / "checkpoints").exists()
    if is_run:
        fields = {k: v for k, v in run_lib.load_config(source).model.items() if k not in FREE_MODEL_FIELDS}
    else:
        fields, loaded = read(source, cfg.model)
    plain = lambda v: v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v
    for key, value in sorted(fields.items()):
        if plain(cfg.model.get(key)) != plain(value):
            raise ConfigError(f"{source} has model.{key}={plain(value)!r} but this config has "
                              f"{plain(cfg.model.get(key))!r}; set --config.model.{key} to match")
    if is_run:
        return checkpoint.load_params(cfg, source)[1]
    shardings = jax.tree.map(lambda p: p.sharding, params)
    return jax.tree.map(lambda a, s: jax.device_put(a, s), loaded, shardings)


def _define_flags():
    """The command line's flags (defined only when run as a command: train.py imports this module)."""
    flags.DEFINE_string("workdir", None, "export: the run to export; import: the workdir to write.")
    flags.DEFINE_string("out", None, "export: the directory to write.")
    flags.DEFINE_integer("step", None, "export: the checkpoint step (default: the newest).")
    flags.DEFINE_enum("format", "auto", ("auto", *EXPORT_FORMATS),
                      "export: auto picks cola or llama by projection kind, else colax.")
    flags.DEFINE_integer("max_shard_mb", 5000, "export: weights larger than this are split into shards.")
    flags.DEFINE_bool("overwrite", False, "import: replace a workdir's config and checkpoints.")
    config_flags.DEFINE_config_file("config", None, "import: the run config (default: config.defaults()); "
                                    "its model section is replaced by the checkpoint's.")


@exit_on_error
def main(argv):
    f = flags.FLAGS
    if len(argv) < 2 or argv[1] not in ("import", "export") or len(argv) != 2 + (argv[1] == "import"):
        raise app.UsageError("usage: python -m colax.convert export --workdir RUN --out DIR | "
                             "import SRC --workdir DIR [--config FILE]")
    quiet_library_logs()
    if f.workdir is None:
        raise app.UsageError("--workdir is required")
    if argv[1] == "export":
        if f.out is None:
            raise app.UsageError("export needs --out")
        fmt = export_run(f.workdir, f.out, f.step, f.format, f.max_shard_mb * 10**6)
        print(f"exported {f.workdir} to {f.out} ({fmt} layout)")
    else:
        cfg = import_run(argv[2], f.workdir, f.config, f.overwrite)
        print(f"imported {argv[2]} into {f.workdir}: {cfg.model.projection} model, "
              f"{model.count_params(model.spec_from_config(cfg.model))['total'] / 1e6:.2f}M parameters")


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=parse_flags)
