"""After training: KV-cache generation against full recomputation, sampling filters, evaluation
conventions against losses worked out here, and the evaluate/generate CLIs."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from colax import checkpoint, config, data, evaluate, generate, model, optim, sharding, sources, state, tokenizer
from colax import run as run_lib
from colax.errors import ConfigError, DataError
from conftest import small_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[5, 9, 2], [7, 1, 4, 4, 8, 3, 6], [11, 12, 13, 14, 15]]  # batched, of different lengths


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache, so the CLI subprocesses reuse what this process compiled."""
    path = str(tmp_path_factory.mktemp("jax_cache"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield path
    jax.config.update("jax_compilation_cache_dir", None)


def _model(seed=0, **overrides):
    graphdef, model_state = nnx.split(model.Transformer(small_spec(**overrides), rngs=nnx.Rngs(seed)))
    return graphdef, nnx.to_pure_dict(model_state)


@pytest.mark.parametrize("projection, scan_layers", [("cola", True), ("cola", False), ("dense", True),
                                                     ("dense", False), ("crnet", True)])
def test_cached_decoding_matches_full_recompute_at_every_position(projection, scan_layers):
    graphdef, params = _model(projection=projection, scan_layers=scan_layers)
    spec, max_len, width = nnx.merge(graphdef, params).spec, 12, 8
    rng = np.random.RandomState(1)
    rows = [p + list(rng.randint(0, 64, max_len - len(p))) for p in PROMPTS]  # each row's whole sequence
    full = np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, np.array(rows, np.int32)))  # no cache
    # Prefill over right-padded prompts (logits at every prompt position), then teacher-forced steps.
    tokens = np.full((3, width), 63, np.int32)
    for b, p in enumerate(PROMPTS):
        tokens[b, :len(p)] = p
    prefill = jax.jit(lambda p, t, pos, c: nnx.merge(graphdef, p).decode(t, pos, c))
    logits, cache = prefill(params, tokens, np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape),
                            model.init_cache(spec, 3, max_len))
    for b, p in enumerate(PROMPTS):
        np.testing.assert_allclose(logits[b, :len(p)], full[b][:len(p)], rtol=0, atol=2e-5)
    lengths = np.array([len(p) for p in PROMPTS])
    key, zero, one = jax.random.key(0), jnp.float32(0), jnp.float32(1)
    for pos in range(lengths.min(), max_len):
        positions = np.minimum(np.maximum(lengths, pos), max_len - 1)  # rows start decoding at their own length
        fed = np.array([rows[b][positions[b]] for b in range(3)], np.int32)
        _, step_logits, cache = generate._step(params, cache, fed[:, None], positions[:, None], np.zeros(3, np.int32),
                                               key, zero, one, graphdef=graphdef, top_k=0)
        for b in range(3):
            if pos >= lengths[b]:
                np.testing.assert_allclose(step_logits[b], full[b][pos], rtol=0, atol=2e-5, err_msg=f"row {b} @ {pos}")


def _greedy_by_recompute(graphdef, params, prompt, new, length):
    """Greedy continuation by a full forward pass per token over a [1, length] buffer (causal: the
    zeros after the last token do not change its logits)."""
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
    tokens = np.zeros((1, length), np.int32)
    tokens[0, :len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + new):
        tokens[0, i] = np.argmax(forward(params, tokens)[0, i - 1])
    return list(tokens[0, len(prompt):len(prompt) + new])


def test_greedy_batch_equals_one_prompt_at_a_time_recompute_and_ignores_the_seed():
    graphdef, params = _model(seed=3)
    out, stats = generate.generate(params, graphdef, PROMPTS, 6, eos_id=-1, max_len=12, seed=0)
    again, _ = generate.generate(params, graphdef, PROMPTS, 6, eos_id=-1, max_len=12, seed=1)
    for b, p in enumerate(PROMPTS):
        want = _greedy_by_recompute(graphdef, params, p, min(6, 12 - len(p)), 12)
        assert list(out[b]) == want and list(again[b]) == want
    assert stats["new_tokens"] == 6 + 5 + 6 and stats["prompt_tokens"] == 15


def test_stops_at_eos_and_at_max_tokens():
    graphdef, params = _model(seed=3)
    first, _ = generate.generate(params, graphdef, PROMPTS, 6, eos_id=-1, max_len=12)
    eos = int(first[0][2])  # row 0's third greedy token taken as EOS: each row stops before its first one
    cut, stats = generate.generate(params, graphdef, PROMPTS, 6, eos_id=eos, max_len=12)
    for row, ids in zip(first, cut):
        stop = list(ids).index(eos) if eos in ids else len(ids)
        assert list(ids) == list(row[:stop]) and eos not in ids
    assert len(cut[0]) == list(first[0]).index(eos) <= 2 and stats["new_tokens"] == sum(map(len, cut))
    short, _ = generate.generate(params, graphdef, PROMPTS, 2, eos_id=-1, max_len=12)
    assert [list(s) for s in short] == [list(row[:2]) for row in first]


def test_no_recompilation_per_token_or_prompt_length_within_a_bucket():
    graphdef, params = _model(seed=3)
    compiles = []
    listener = lambda event, *a, **k: compiles.append(event) if event.endswith("backend_compile_duration") else None
    generate.generate(params, graphdef, PROMPTS, 2, eos_id=-1, max_len=12)  # compiles prefill and decode
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:  # other prompt lengths and token counts in the same bucket
        generate.generate(params, graphdef, [[1] * 9, [4], [4, 5, 6, 7]], 3, eos_id=-1, max_len=12, top_p=0.9)
        generate.generate(params, graphdef, [[1, 2], [3, 3, 3, 3, 3, 3], [4]], 9, eos_id=-1, max_len=12, seed=5)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    assert [generate.bucket(n, 40) for n in (1, 16, 17, 33)] == [16, 16, 32, 40]


@functools.partial(jax.jit, static_argnames="top_k")
def _draws(logits, top_k=0, top_p=1.0, n=2000):
    """n samples at temperature 1 from logits [V] (a compile per top_k only)."""
    keys = jax.random.split(jax.random.key(0), n)
    return jax.vmap(lambda k: generate.sample(logits[None], k, jnp.float32(1.0), top_k, top_p)[0])(keys)


def test_top_k_and_top_p_never_sample_outside_their_set():
    probs = np.array([0.02, 0.3, 0.05, 0.25, 0.04, 0.2, 0.06, 0.08])  # distinct, sums to 1
    logits = jnp.asarray(np.log(probs), jnp.float32)
    top3 = {1, 3, 5}  # the three largest
    for kw in (dict(top_k=3), dict(top_p=0.6)):  # nucleus of 0.6: mass before 0.3, 0.25, 0.2 is < 0.6
        draws = np.asarray(_draws(logits, **kw))
        assert set(draws.tolist()) == top3, kw
        freq = np.bincount(draws, minlength=8)[[1, 3, 5]] / len(draws)
        np.testing.assert_allclose(freq, probs[[1, 3, 5]] / 0.75, atol=0.04)  # renormalised within the set
    assert set(np.asarray(_draws(logits, top_p=0.31)).tolist()) == {1, 3}  # 0.3 < 0.31: the second is in
    assert set(np.asarray(_draws(logits)).tolist()) == set(range(8))  # no filter: every token appears
    assert set(np.asarray(generate.sample(jnp.stack([logits] * 3), jax.random.key(0),
                                          jnp.float32(0.0), top_k=2)).tolist()) == {1}  # greedy


def test_prompt_errors():
    graphdef, params = _model()
    with pytest.raises(DataError, match=r"prompt 1 is 12 tokens long: prompt and new tokens are limited to 12 "
                                        r"tokens \(max_len\), so it must be shorter"):
        generate.generate(params, graphdef, [[1], [2] * 12], 4, eos_id=-1, max_len=12)
    with pytest.raises(DataError, match="prompt 0 is empty"):
        generate.generate(params, graphdef, [[]], 4, eos_id=-1, max_len=12)


# Evaluation on a tiny fixed corpus: 7 held-out documents, batches of 2 rows (the last padded).
DOCS = [f"doc {i}: " + "alpha beta gamma " * (i % 4) + "delta" * (i % 3) for i in range(30)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(cfg, tokenizer, graphdef, params, workdir): a tiny CoLA model saved as step 3 of a run folder."""
    root = tmp_path_factory.mktemp("run")
    (root / "corpus.txt").write_text("\n\n".join(DOCS))
    cfg = config.preset("cola", "tiny")
    cfg.model.update(vocab_size=320, hidden_size=32, intermediate_size=48, num_heads=4, num_layers=2, rank=8,
                     dtype="float32")
    cfg.data.update(source="text", path=str(root / "corpus.txt"), val_docs=7, seq_len=16, shuffle=False)
    cfg.train.update(batch_size=2, micro_batch_size=2, steps=3)
    cfg.optim.update(warmup_steps=1)
    workdir = str(root / "workdir")
    run_lib.prepare_workdir(workdir, cfg)
    tok = tokenizer.train_tokenizer(DOCS, os.path.join(workdir, "tokenizer"), 320, "bpe", 30)
    spec = config.validate(cfg)
    tx = optim.make(cfg.optim, cfg.train.steps)
    graphdef, params, opt_state = state.init_state(spec, tx, sharding.make_mesh(cfg.mesh), seed=0)
    mngr = checkpoint.manager(workdir, cfg.train)
    checkpoint.save(mngr, 3, params, opt_state, data.make_pipeline(cfg.data, tok, split="train", global_batch_size=2))
    mngr.wait_until_finished()
    return cfg, tok, graphdef, params, workdir


def _hand_sums(cfg, tok, graphdef, params, rows):
    """Per-batch (summed cross-entropy, targets, non-pad inputs) written out from each document alone."""
    out = []
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
    docs = list(sources.document_dataset(cfg.data, "val"))
    for i in range(0, len(docs), rows):
        s = n = inputs = 0.0
        for doc in docs[i:i + rows]:
            ids = tok.encode(doc)[:cfg.data.seq_len] + [tok.eos_id]  # the paper's row: truncate, then EOS
            inputs_row = np.zeros((1, cfg.data.seq_len), np.int32)  # causal: the zeros after do not matter
            inputs_row[0, :len(ids) - 1] = ids[:-1]
            logits = np.asarray(forward(params, inputs_row))[0].astype(np.float64)
            logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                - logits.max(-1, keepdims=True)
            s -= sum(logp[t, ids[t + 1]] for t in range(len(ids) - 1))
            n += len(ids) - 1
            inputs += min(len(ids), cfg.data.seq_len)
        out.append((s, n, inputs))
    return out


def test_evaluation_matches_hand_computed_loss_in_both_conventions(run):
    cfg, tok, graphdef, params, _ = run
    sums = _hand_sums(cfg, tok, graphdef, params, 2)
    assert len(sums) == 4  # 7 documents in batches of 2
    token = sum(s for s, _, _ in sums) / sum(n for _, n, _ in sums)
    reference = sum(s / n for s, n, _ in sums) / (len(sums) + 1)
    got = evaluate.evaluate_run(cfg, tok, graphdef, params, "token", max_tokens=0, rows=2)
    assert got["loss"] == pytest.approx(token, rel=1e-5) and got["batches"] == 4
    assert got["ppl"] == pytest.approx(np.exp(token), rel=1e-5)
    got = evaluate.evaluate_run(cfg, tok, graphdef, params, "reference", max_tokens=0, rows=2)
    assert got["loss"] == pytest.approx(reference, rel=1e-5)
    # The reference's stopping rule: run batches until more than max_tokens non-pad inputs were seen.
    limit = sums[0][2] + 1  # exceeded after the second batch
    got = evaluate.evaluate_run(cfg, tok, graphdef, params, "reference", max_tokens=limit, rows=2)
    assert got["batches"] == 2 and got["input_tokens"] == sums[0][2] + sums[1][2]
    assert got["loss"] == pytest.approx((sums[0][0] / sums[0][1] + sums[1][0] / sums[1][1]) / 3, rel=1e-5)


def _cli(module, *args):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
    return subprocess.run([sys.executable, "-m", f"colax.{module}", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env)


def test_evaluate_and_generate_cli(run, tmp_path):
    cfg, tok, graphdef, params, workdir = run  # in-process first: the CLIs then hit the compilation cache
    want = evaluate.evaluate_run(cfg, tok, graphdef, params, "reference", max_tokens=0, rows=2)
    outs, _ = generate.generate(params, graphdef, [tok.encode(p) for p in ("doc 1", "doc 3: alpha", "delta")], 5,
                                tok.eos_id, cfg.data.seq_len)
    proc = _cli("evaluate", f"--workdir={workdir}", "--max_tokens=0", "--batch_rows=2", "--convention=reference")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["step"] == 3 and result["loss"] == pytest.approx(want["loss"], rel=1e-5)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("doc 3: alpha\n\ndelta\n")
    proc = _cli("generate", f"--workdir={workdir}", "--prompt=doc 1", f"--prompt-file={prompts}", "--max_new_tokens=5")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:3] == [p + tok.decode([int(i) for i in o]) for p, o in zip(("doc 1", "doc 3: alpha", "delta"), outs)]
    assert "3 prompt(s)" in lines[3] and "tokens/s" in lines[3]


@pytest.mark.parametrize("module, args, message", [
    ("evaluate", ["--workdir={empty}"], "error: no checkpoint in {empty}/checkpoints"),
    # Issue 33, item 7: the limit is the cache length, --max_len (default data.seq_len), not the model's.
    ("generate", ["--workdir={workdir}", "--prompt={long}"],
     "error: prompt 0 is {n} tokens long: prompt and new tokens are limited to 16 tokens (data.seq_len, the "
     "default of --max_len), so it must be shorter"),
    ("generate", ["--workdir={workdir}", "--prompt={long}", "--max_len=20"],
     "error: prompt 0 is {n} tokens long: prompt and new tokens are limited to 20 tokens (--max_len=20), so it "
     "must be shorter"),
])
def test_cli_one_line_errors(run, tmp_path, module, args, message):
    tok, workdir = run[1], run[4]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(open(os.path.join(workdir, "config.json")).read())
    long = "alpha beta gamma " * 12
    fill = dict(empty=str(empty), workdir=workdir, long=long, n=len(tok.encode(long)))
    proc = _cli(module, *[a.format(**fill) for a in args])
    assert proc.returncode == 2 and proc.stderr.startswith(message.format(**fill)), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_run_config_from_an_older_colax_gets_new_keys_defaults(run, tmp_path):
    stored = json.loads(open(os.path.join(run[4], "config.json")).read())
    del stored["model"]["kernel"], stored["train"]["sample_tokens"]  # keys "added after the run was written"
    stored["data"]["seq_len"] = 24
    (tmp_path / "config.json").write_text(json.dumps(stored))
    cfg = run_lib.load_config(tmp_path, {"train.seed": 7})
    assert (cfg.model.kernel, cfg.train.sample_tokens) == (config.defaults().model.kernel,
                                                           config.defaults().train.sample_tokens)
    assert (cfg.data.seq_len, cfg.train.seed, cfg.model.vocab_size) == (24, 7, 320)
    stored["model"]["bogus"] = 1
    (tmp_path / "config.json").write_text(json.dumps(stored))
    with pytest.raises(ConfigError, match="unknown config key model.bogus"):
        run_lib.load_config(tmp_path)
