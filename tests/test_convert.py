"""colax.convert (safetensors: colax, CoLA, CoLA-M, Hugging Face LLaMA layouts), model.pad_id, train.init_from.

The layouts are checked against the key names and shapes written out here from the issue, and the
exported weights against a numpy LLaMA/CoLA forward pass written here from the Hugging Face
modelling code's math (float64), not through colax.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from colax import checkpoint, config, convert, data, evaluate, loop, model, optim, projections, step, tokenizer
from colax import run as run_lib
from colax.errors import ConfigError, DataError
from conftest import authors_package

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, F, N, L, R, V = 32, 48, 4, 2, 8, 64
TOKENS = np.array([5, 0, 17, 63, 2, 0, 9, 41, 33, 1, 12, 7], np.int32)


def tiny_cfg(projection="cola", **model_fields):
    cfg = config.defaults()
    cfg.model.update(projection=projection, vocab_size=V, hidden_size=D, intermediate_size=F, num_heads=N,
                     num_layers=L, rank=R, dtype="float32", **model_fields)
    return cfg


def random_params(cfg_model, seed=0):
    """Every parameter i.i.d. normal (norm weights around 1), so no mix-up of keys can go unseen."""
    abstract = convert.abstract_params(cfg_model)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, a: (float(path[-1].key == "weight") + 0.3 * rng.standard_normal(a.shape)).astype(a.dtype),
        abstract)


def colax_logits(cfg_model, params, tokens=TOKENS):
    spec = model.spec_from_config(cfg_model)
    return np.asarray(nnx.merge(nnx.graphdef(model.abstract_model(spec)), params)(jnp.asarray(tokens)[None])[0])


# --- numpy reference: Hugging Face LlamaForCausalLM math on a state dict, CoLA projections as x @ A ---

def silu(x):
    return x / (1.0 + np.exp(-x))


def rms_norm(x, w, eps):
    return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))


def rope(x, theta):
    """x [T, N, H] -> rotated by position (rotate-half convention)."""
    t, _, h = x.shape
    angle = np.arange(t)[:, None] * (1.0 / theta ** (np.arange(0, h, 2) / h))[None]  # [T, H/2]
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    x1, x2 = x[..., :h // 2], x[..., h // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def reference_logits(sd, conf, tokens=TOKENS):
    """logits [T, V] (float64) of one row of tokens from a state dict and its config.json."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    n, d, eps, theta = conf["num_attention_heads"], conf["hidden_size"], conf["rms_norm_eps"], conf["rope_theta"]
    h, t = d // n, len(tokens)

    def proj(x, name):
        if name + ".weight" in sd:  # torch Linear: [out, in]
            return x @ sd[name + ".weight"].T
        return silu(x @ sd[name + ".cola_a"]) @ sd[name + ".cola_b"]

    x = sd["model.embed_tokens.weight"][tokens]
    causal = np.tril(np.ones((t, t), bool))
    for i in range(conf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        y = rms_norm(x, sd[p + "input_layernorm.weight"], eps)
        q, k, v = (proj(y, p + f"self_attn.{m}_proj").reshape(t, n, h) for m in "qkv")
        s = np.einsum("qnh,knh->nqk", rope(q, theta), rope(k, theta)) / np.sqrt(h)
        s = np.where(causal, s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + proj(np.einsum("nqk,knh->qnh", a, v).reshape(t, d), p + "self_attn.o_proj")
        y = rms_norm(x, sd[p + "post_attention_layernorm.weight"], eps)
        gate = proj(y, p + "mlp.gate_proj")
        gate = gate if conf.get("only_lr_act") else silu(gate)
        x = x + proj(gate * proj(y, p + "mlp.up_proj"), p + "mlp.down_proj")
    return rms_norm(x, sd["model.norm.weight"], eps) @ sd["lm_head.weight"].T


def read_dir(path):
    """(state dict, config.json dict) of an exported directory (one safetensors file)."""
    with safe_open(str(path / "model.safetensors"), framework="np") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    return sd, json.loads((path / "config.json").read_text())


def assert_same_params(a, b):
    fa, fb = (traverse_util.flatten_dict(x, sep=".") for x in (a, b))
    assert sorted(fa) == sorted(fb)
    for key in fa:
        assert np.asarray(fa[key]).dtype == np.asarray(fb[key]).dtype, key
        np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]), err_msg=key)


# --- layouts -------------------------------------------------------------------------------------

def test_export_then_import_is_identity_for_every_kind_and_layout(tmp_path):
    cases = [(kind, fmt) for kind in projections.PROJECTIONS for fmt in ("colax", "cola", "llama")
             if fmt == "colax" or convert.LAYOUTS[fmt].projection == kind]
    assert {"cola", "dense"} <= {kind for kind, fmt in cases if fmt != "colax"}
    for kind, fmt in cases + [("cola", "cola_bf16")]:
        bf16 = fmt.endswith("bf16")
        cfg = tiny_cfg(kind, ranks={"gate": 4}, pad_id=3, **({"param_dtype": "bfloat16"} if bf16 else {}))
        if kind == "dense":
            cfg.model.ranks.gate = 0
        params = random_params(cfg.model, seed=len(tmp_path.name))
        out = tmp_path / f"{kind}_{fmt}"
        assert convert.export(cfg, params, out, fmt.removesuffix("_bf16")) == fmt.removesuffix("_bf16")
        fields, loaded = convert.read(out, cfg.model)
        assert_same_params(loaded, params)
        for key, value in fields.items():
            assert (value if not isinstance(value, dict) else config.ml_collections.ConfigDict(value)) == \
                cfg.model[key], (kind, fmt, key)


def expected_cola_shapes():
    """The authors' CoLA key names and shapes (issue 11), for d=D, f=F, L layers, rank R (gate: 4)."""
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (D,)
        for m in "qkvo":
            shapes[p + f"self_attn.{m}_proj.cola_a"], shapes[p + f"self_attn.{m}_proj.cola_b"] = (D, R), (R, D)
        shapes[p + "mlp.gate_proj.cola_a"], shapes[p + "mlp.gate_proj.cola_b"] = (D, 4), (4, F)
        shapes[p + "mlp.up_proj.cola_a"], shapes[p + "mlp.up_proj.cola_b"] = (D, R), (R, F)
        shapes[p + "mlp.down_proj.cola_a"], shapes[p + "mlp.down_proj.cola_b"] = (F, R), (R, D)
    return shapes


@pytest.fixture(scope="module")
def cola_export(tmp_path_factory):
    """(cfg, params, directory) of a tiny CoLA model (only_lr_act, gate rank 4) exported in the cola layout."""
    cfg = tiny_cfg("cola", only_lr_act=True, ranks={"gate": 4}, pad_id=0, rope_theta=500.0, norm_eps=1e-5)
    params = random_params(cfg.model, seed=1)
    out = tmp_path_factory.mktemp("cola")
    convert.export(cfg, params, out)
    return cfg, params, out


def test_cola_export_has_the_reference_names_shapes_config_and_function(cola_export):
    cfg, params, out = cola_export
    sd, conf = read_dir(out)
    assert {k: v.shape for k, v in sd.items()} == expected_cola_shapes()
    assert {k: conf[k] for k in ("model_type", "hidden_size", "intermediate_size", "num_attention_heads",
                                 "num_hidden_layers", "rank", "only_lr_act", "vocab_size", "rms_norm_eps",
                                 "rope_theta", "hidden_act", "pad_token_id", "tie_word_embeddings")} == dict(
        model_type="cola", hidden_size=D, intermediate_size=F, num_attention_heads=N, num_hidden_layers=L,
        rank=R, only_lr_act=True, vocab_size=V, rms_norm_eps=1e-5, rope_theta=500.0, hidden_act="silu",
        pad_token_id=0, tie_word_embeddings=False)
    assert {"bos_token_id", "eos_token_id"} <= set(conf) and "_attn_implementation_autoset" not in conf
    ref = reference_logits(sd, conf)
    np.testing.assert_allclose(colax_logits(cfg.model, params), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def to_cola_m(sd):
    """The CoLA-M names of a CoLA state dict (issue 11): same factors, layer i's down B in layer i + 1."""
    names = {"q": ("pre_attn.pre_q_proj", "self_attn.post_q_proj"),
             "k": ("pre_attn.pre_k_proj", "self_attn.post_k_proj"),
             "v": ("pre_attn.pre_v_proj", "self_attn.post_v_proj"),
             "o": ("self_attn.pre_o_proj", "post_attn.post_o_proj"),
             "gate": ("pre_mlp.pre_gate_proj", "self_mlp.post_gate_proj"),
             "up": ("pre_mlp.pre_up_proj", "self_mlp.post_up_proj"), "down": ("self_mlp.pre_down_proj", None)}
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if not key.endswith(("cola_a", "cola_b")):
            out[key] = value
            continue
        i, m, factor = int(parts[2]), parts[4].removesuffix("_proj"), parts[5]
        if (m, factor) == ("down", "cola_b"):
            new = (f"model.layers.{i + 1}.last_layer_post_mlp.post_down_proj.cola_b" if i + 1 < L
                   else f"model.layers.{i}.post_mlp.post_down_proj.cola_b")
        else:
            new = f"model.layers.{i}.{names[m][factor == 'cola_b']}.{factor}"
        out[new] = value
    return out


def test_cola_m_file_imports_to_the_same_function(cola_export, tmp_path):
    cfg, params, out = cola_export
    sd, conf = read_dir(out)
    cola_m = to_cola_m(sd)
    assert len(cola_m) == len(sd) and "model.layers.1.last_layer_post_mlp.post_down_proj.cola_b" in cola_m
    save_file(cola_m, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(conf))
    fields, loaded = convert.read(tmp_path / "model.safetensors")  # a single file, config.json beside it
    assert_same_params(loaded, params)
    ref = reference_logits(sd, conf)
    m = model.defaults()
    m.update(fields, dtype="float32")
    np.testing.assert_allclose(colax_logits(m, loaded), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # The last layer's down B may also sit in the model's post_mlp rather than the last layer's.
    last = f"model.layers.{L - 1}.post_mlp.post_down_proj.cola_b"
    save_file({**{k: v for k, v in cola_m.items() if k != last}, "model.post_mlp.post_down_proj.cola_b": cola_m[last]},
              str(tmp_path / "model.safetensors"))
    assert_same_params(convert.read(tmp_path)[1], params)


def test_full_rank_export_is_a_hugging_face_llama(tmp_path):
    cfg = tiny_cfg("dense", rope_theta=1000.0)
    params = random_params(cfg.model, seed=2)
    assert convert.export(cfg, params, tmp_path) == "llama"
    sd, conf = read_dir(tmp_path)
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                       **{p + f"self_attn.{m}_proj.weight": (D, D) for m in "qkvo"},
                       p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                       p + "mlp.down_proj.weight": (D, F)})
    assert {k: v.shape for k, v in sd.items()} == shapes
    assert conf["architectures"] == ["LlamaForCausalLM"] and conf["model_type"] == "llama"
    assert {k: conf[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                                 "num_hidden_layers", "vocab_size", "rope_theta", "tie_word_embeddings")} == dict(
        hidden_size=D, intermediate_size=F, num_attention_heads=N, num_key_value_heads=N, num_hidden_layers=L,
        vocab_size=V, rope_theta=1000.0, tie_word_embeddings=False)
    assert "_attn_implementation_autoset" not in conf
    ref = reference_logits(sd, conf)  # q/k/v/o are square: only the function tells [out, in] from [in, out]
    np.testing.assert_allclose(colax_logits(cfg.model, params), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # transformers 5 re-saves RoPE as rope_parameters: read the same; scaled RoPE is refused.
    conf["rope_parameters"] = dict(rope_type="default", rope_theta=conf.pop("rope_theta"))
    (tmp_path / "config.json").write_text(json.dumps(conf))
    assert convert.read(tmp_path, cfg.model)[0]["rope_theta"] == 1000.0
    conf["rope_parameters"]["rope_type"] = "llama3"
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(DataError, match="rope_parameters must have rope_type 'default'"):
        convert.read(tmp_path, cfg.model)


def test_sharded_files_with_index(cola_export, tmp_path):
    cfg, params, _ = cola_export
    convert.export(cfg, params, tmp_path, max_shard_bytes=4000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (tmp_path / "model.safetensors").exists()
    assert_same_params(convert.read(tmp_path, cfg.model)[1], params)
    convert.export(cfg, params, tmp_path)  # one file now: the shards and index of before are gone
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


def test_bad_checkpoints_give_one_line_errors(cola_export, tmp_path):
    cfg, _, out = cola_export
    sd, conf = read_dir(out)
    key = "model.layers.1.mlp.up_proj.cola_b"

    def read_bad(state, config_json=conf):
        save_file(state, str(tmp_path / "model.safetensors"))
        (tmp_path / "config.json").write_text(json.dumps(config_json))
        with pytest.raises(DataError) as e:
            convert.read(tmp_path)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert f"missing {key} (expected shape [{R}, {F}])" in read_bad({k: v for k, v in sd.items() if k != key})
    assert "unexpected model.layers.0.mlp.up_proj.bias (shape [48])" in read_bad(
        {**sd, "model.layers.0.mlp.up_proj.bias": np.zeros(F, np.float32)})
    assert f"{key} has shape [{R}, {F + 1}], expected [{R}, {F}]" in read_bad(
        {**sd, key: np.zeros((R, F + 1), np.float32)})
    assert "unknown model_type 'gpt2'" in read_bad(sd, {**conf, "model_type": "gpt2"})
    assert "num_key_value_heads must equal" in read_bad(sd, {**conf, "num_key_value_heads": 2})
    (tmp_path / "config.json").write_text(json.dumps(conf))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(DataError, match="not a readable safetensors file"):
        convert.read(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(DataError, match="config.json: not valid JSON"):
        convert.read(tmp_path)
    with pytest.raises(ConfigError, match="projection kind 'dense' has no 'cola' layout"):
        convert.export(tiny_cfg("dense"), random_params(tiny_cfg("dense").model), tmp_path / "x", "cola")


# --- model.pad_id ---------------------------------------------------------------------------------

def test_pad_row_starts_at_zero_gets_no_gradient_and_stays_zero_through_training():
    cfg = tiny_cfg("cola", pad_id=0)
    cfg.optim.update(lr=0.01, warmup_steps=0, weight_decay=0.1, grad_clip=0.0)
    spec = model.spec_from_config(cfg.model)
    graphdef, state = nnx.split(model.Transformer(spec, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)
    np.testing.assert_array_equal(params["embed"][0], 0.0)
    tx = optim.make(cfg.optim, 10)
    train_step = jax.jit(step.make_train_step(graphdef, tx))
    rows = np.stack([np.roll(TOKENS, s) for s in range(4)])  # token 0 is an input in every row
    batch = jax.tree.map(lambda x: jnp.asarray(x)[None], dict(
        inputs=rows, targets=np.roll(rows, -1, axis=1), loss_mask=np.ones(rows.shape, np.float32)))

    def train(params, steps=3):
        opt_state, losses = tx.init(params), []
        for _ in range(steps):
            params, opt_state, m = train_step(params, opt_state, batch)
            losses.append(float(m["loss"]))
        return np.asarray(params["embed"]), losses

    embed, losses = train(params)
    np.testing.assert_array_equal(embed[0], 0.0)
    assert np.abs(embed[17] - np.asarray(params["embed"][17])).max() > 1e-4  # a used row trains
    # An imported table may hold any pad row: the forward pass uses it (as torch's padding_idx does),
    # no gradient reaches it, so AdamW's decoupled weight decay is its only change.
    params["embed"] = params["embed"].at[0].set(1.0)
    embed, losses_one = train(params)
    decay = np.prod([1 - float(optim.schedule(cfg.optim, 10)(s)) * 0.1 for s in range(3)])
    np.testing.assert_allclose(embed[0], decay, rtol=1e-6)
    assert abs(losses_one[0] - losses[0]) > 1e-4


# --- import, train.init_from, CLI -----------------------------------------------------------------

MICRO = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_heads=4, num_layers=2, rank=8, dtype="float32")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A micro CoLA config on the stdlib corpus with a test-local tokenizer: 1 step of 8 x 32 tokens."""
    cfg = config.preset("cola", "tiny")
    cfg.model.update(**MICRO)
    cfg.data.update(seq_len=32, tokenizer_vocab_size=512, tokenizer_sample_docs=20, val_docs=16)
    cfg.optim.update(lr=0.01, warmup_steps=0)
    cfg.train.update(steps=1, batch_size=8, micro_batch_size=8, log_every=1, eval_every=0, eval_batches=1,
                     baseline_batches=0, checkpoint_every=1, sample_tokens=0)
    out = str(tmp_path_factory.mktemp("tok") / "micro")
    cfg.data.tokenizer = tokenizer.train_tokenizer(data.train_documents(cfg.data, 20), out, 512, "bpe", 20).path
    return cfg


def test_import_then_load_continue_training_and_export(micro, tmp_path):
    params = random_params(micro.model, seed=3)
    convert.export(micro, params, tmp_path / "exported")
    cfg = convert.import_run(str(tmp_path / "exported"), str(tmp_path / "imported"), micro)
    assert cfg.model.to_dict() == micro.model.to_dict()
    run_cfg, tok, graphdef, loaded, at = run_lib.load_run(str(tmp_path / "imported"))  # as evaluate/generate
    assert at == 0 and run_cfg.to_dict() == cfg.to_dict()
    assert_same_params(jax.device_get(loaded), params)
    # colax.evaluate on the import = the token-weighted loss of the exported state dict by numpy.
    result = evaluate.evaluate_run(run_cfg, tok, graphdef, loaded, max_tokens=0, rows=8)
    sd, conf = read_dir(tmp_path / "exported")
    nll = count = 0.0
    for b in evaluate.val_batches(run_cfg, tok, 8):
        for inputs, targets, mask in zip(b["inputs"], b["targets"], b["loss_mask"]):
            logits = reference_logits(sd, conf, inputs)
            logp = logits - logits.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            nll -= (logp[np.arange(len(targets)), targets] * mask).sum()
            count += mask.sum()
    assert result["targets"] == count and result["loss"] == pytest.approx(nll / count, rel=1e-5)
    # The first training loss of a run started from the import is the imported model's loss on that batch.
    first = next(data.make_pipeline(cfg.data, tokenizer.load_tokenizer(cfg.data.tokenizer), split="train",
                                    global_batch_size=cfg.train.batch_size))
    loss_sum, count = jax.jit(step.loss_sums, static_argnums=1)(params, graphdef, first)
    cfg.train.init_from = str(tmp_path / "imported")
    loop.run(cfg, str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        assert json.loads(f.readline())["loss"] == pytest.approx(float(loss_sum / count), rel=1e-5)
    # Straight from safetensors, onto fresh parameters' shardings; a model mismatch is named.
    fresh = jax.tree.map(jnp.zeros_like, loaded)
    assert_same_params(jax.device_get(convert.init_params(cfg, fresh, str(tmp_path / "exported"))), params)
    cfg.model.only_lr_act = True
    with pytest.raises(ConfigError, match="has model.only_lr_act=False but this config has True"):
        convert.init_params(cfg, fresh, str(tmp_path / "exported"))
    # The trained run exports with its tokenizer (ids in config.json) and reads back as its checkpoint.
    assert convert.export_run(str(tmp_path / "run"), str(tmp_path / "back")) == "cola"
    conf = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (conf["eos_token_id"], conf["bos_token_id"]) == (1, None)
    assert (tmp_path / "back" / "tokenizer.model").exists()
    trained = jax.device_get(checkpoint.load_params(micro, str(tmp_path / "run"))[1])
    assert_same_params(convert.read(tmp_path / "back", micro.model)[1], trained)


def test_cli_one_line_errors(cola_export, tmp_path):
    cli = [sys.executable, "-m", "colax.convert"]
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(cli + ["import", str(tmp_path / "missing"), f"--workdir={tmp_path / 'x'}"],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert done.stderr.startswith(f"error: {tmp_path / 'missing'}: no such file or directory")


def test_galore_family_llama_with_pad_token_id_minus_one_imports_with_transformers_logits(tmp_path):
    """GaLore's configs/llama_60m.json (jiaweizzhao/GaLore@8460814) at tiny sizes: pad_token_id -1
    means no pad token; the imported model's logits equal transformers' LlamaForCausalLM's."""
    torch = authors_package("torch")
    transformers = authors_package("transformers")
    conf = {"architectures": ["LLaMAForCausalLM"], "bos_token_id": 0, "eos_token_id": 1, "hidden_act": "silu",
            "hidden_size": D, "intermediate_size": F, "initializer_range": 0.02, "max_sequence_length": 1024,
            "model_type": "llama", "num_attention_heads": N, "num_hidden_layers": L, "pad_token_id": -1,
            "rms_norm_eps": 1e-06, "transformers_version": "4.28.1", "use_cache": True, "vocab_size": V}
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**conf)).eval()
    hf.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(conf))  # the file as GaLore ships it
    with torch.no_grad():
        ref = hf(torch.as_tensor(TOKENS[None], dtype=torch.long)).logits[0].numpy()
    cfg = tiny_cfg("dense")
    fields, params = convert.read(tmp_path, cfg.model)
    assert fields["pad_id"] is None
    cfg.model.update(fields)
    np.testing.assert_allclose(colax_logits(cfg.model, params), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
