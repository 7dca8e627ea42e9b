"""Generation with a KV cache: `python -m colax.generate --workdir DIR --prompt "..." [--prompt-file F]`.

A batch of prompts (token ids, any lengths) is right-padded to a bucket length T (a power of two,
at least BUCKET_MIN, at most the cache length S = max_len). Prefill runs the blocks once over
[B, T], writes every token's k and v (after RoPE) into a cache of fixed shape [L, B, S, N, H] at
slot = position, and samples each row's first new token from its last prompt position. Then one
jitted decode step per token feeds row b's latest token at its own position (len_b, len_b + 1,
...), writes its k and v there and attends to slots <= that position, so the padding slots a
prompt left are overwritten before they could be seen. The compiled step depends on (B, T) for
prefill and on B for decode, never on the prompt lengths within a bucket or on the token index.
Both go through `Transformer.decode`, i.e. the training blocks and projections.
"""

from colax import errors, host

if __name__ == "__main__":  # Ctrl-C while the imports below load: one line, exit 130
    errors.exit_on_signal("interrupted")
    host.reuse_freed_memory()  # before JAX starts its threads (colax.host)

import functools  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from colax import model as model_lib  # noqa: E402
from colax import run as run_lib  # noqa: E402
from colax.errors import DataError, exit_on_error, parse_flags  # noqa: E402

BUCKET_MIN = 16


def bucket(n, max_len):
    """The prefill length for a longest prompt of n tokens: a power of two >= max(n, BUCKET_MIN),
    at most max_len."""
    return min(max(BUCKET_MIN, 1 << (n - 1).bit_length()), max_len)


def filter_logits(logits, top_k, top_p):
    """logits float32 [B, V] with every token outside the top-k (k > 0, static) and outside the
    top-p nucleus (the most likely tokens whose probability mass before each is < top_p; top_p >= 1:
    off) set to -inf. Ties with the last kept logit are kept."""
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)

    def nucleus(logits):
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p
        cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(logits >= cutoff, logits, -jnp.inf)

    return jax.lax.cond(top_p < 1.0, nucleus, lambda x: x, logits)  # no sort over V unless asked


def sample(logits, key, temperature, top_k=0, top_p=1.0):
    """Next tokens int32 [B] from logits float32 [B, V]: argmax if temperature is 0, else a draw
    from softmax(filter_logits(logits / temperature, top_k, top_p))."""
    draw = lambda: jax.random.categorical(key, filter_logits(logits / temperature, top_k, top_p), axis=-1)
    return jax.lax.cond(temperature > 0, draw, lambda: jnp.argmax(logits, axis=-1)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "top_k"), donate_argnames=("cache",))
def _step(params, cache, tokens, positions, at, key, temperature, top_p, *, graphdef, top_k):
    """Prefill (tokens, positions [B, T]) or a decode step (T = 1); at: int32 [B] index into T.

    Returns (next tokens int32 [B], their logits float32 [B, V], the updated cache).
    """
    logits, cache = nnx.merge(graphdef, params).decode(tokens, positions, cache, at)
    return sample(logits, key, temperature, top_k, top_p), logits, cache


def check_prompts(prompts, max_len, limit="max_len"):
    """DataError naming the first prompt (list of ids) that is empty or leaves no room below max_len
    (prompt and new tokens at most, the cache length); `limit` names the setting that gave max_len."""
    for i, p in enumerate(prompts):
        if not p:
            raise DataError(f"prompt {i} is empty (the model needs at least one token to continue)")
        if len(p) >= max_len:
            raise DataError(f"prompt {i} is {len(p)} tokens long: prompt and new tokens are limited to {max_len} "
                            f"tokens ({limit}), so it must be shorter")


def generate(params, graphdef, prompts, max_new_tokens, eos_id, max_len, temperature=0.0, top_k=0, top_p=1.0,
             seed=0):
    """Continues each prompt (a list of token id lists) by up to `max_new_tokens` ids.

    A row stops at EOS (not returned) or at `max_len` tokens in all. Greedy if temperature is 0.
    Returns (list of int32 numpy arrays, one per prompt, and stats): "prompt_tokens", "new_tokens"
    (returned), "prefill_s" (prefill and the first token: includes compiling it for a new batch size
    or bucket), "decode_steps" and "decode_s" (the steps after the first, which compiles the step for
    a new batch size) and "decode_tokens_per_s" (rows x decode_steps / decode_s; None under 2 steps).
    """
    check_prompts(prompts, max_len)
    spec = nnx.merge(graphdef, params).spec
    if not 0 <= top_k <= spec.vocab_size:
        raise DataError(f"top_k must be in [0, vocab size {spec.vocab_size}], got {top_k}")
    batch, lengths = len(prompts), np.array([len(p) for p in prompts], np.int32)
    limits = np.minimum(max_new_tokens, max_len - lengths)  # new tokens row b may produce
    width = bucket(int(lengths.max()), max_len)
    tokens = np.zeros((batch, width), np.int32)
    for row, p in enumerate(prompts):
        tokens[row, :len(p)] = p
    step = functools.partial(_step, graphdef=graphdef, top_k=top_k, temperature=jnp.float32(temperature),
                             top_p=jnp.float32(top_p))
    key = jax.random.key(seed)
    start = time.perf_counter()
    token, _, cache = step(params, model_lib.init_cache(spec, batch, max_len), tokens,
                           np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape), lengths - 1, key=key)
    out = [np.asarray(token)]
    prefill_s = time.perf_counter() - start
    done = (out[-1] == eos_id) | (limits <= 1)
    for i in range(1, int(limits.max())):
        if done.all():
            break
        if i == 2:  # the first step (compiling) is done: time the steady state
            decode_start = time.perf_counter()
        positions = np.minimum(lengths + i - 1, max_len - 1)[:, None]  # rows past their limit: ignored
        token, _, cache = step(params, cache, token[:, None], positions, np.zeros(batch, np.int32),
                               key=jax.random.fold_in(key, i))
        out.append(np.asarray(token))
        done |= (out[-1] == eos_id) | (i + 1 >= limits)
    steps = len(out) - 2
    decode_s = time.perf_counter() - decode_start if steps > 0 else 0.0
    results = []
    for row, ids in enumerate(np.stack(out, axis=1)):
        ids = ids[:limits[row]]
        stop = np.flatnonzero(ids == eos_id)
        results.append(ids[:stop[0]] if stop.size else ids)
    stats = dict(prompt_tokens=int(lengths.sum()), new_tokens=int(sum(len(r) for r in results)),
                 prefill_s=prefill_s, decode_steps=max(steps, 0), decode_s=decode_s,
                 decode_tokens_per_s=batch * steps / decode_s if steps > 0 else None)
    return results, stats


def define_flags():
    """The command line flags of `python -m colax.generate` (defined only when run as a program)."""
    run_lib.define_run_flags()
    flags.DEFINE_multi_string("prompt", [], "A prompt; repeat the flag for a batch of prompts.")
    flags.DEFINE_string("prompt-file", None, "A text file, one prompt per line (added to the --prompt ones).")
    flags.DEFINE_integer("max_new_tokens", 64, "New tokens per prompt at most (a row also stops at EOS).")
    flags.DEFINE_integer("max_len", 0, "Prompt + new tokens at most (the cache length); 0: data.seq_len.")
    flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0: greedy.")
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens only; 0: off.")
    flags.DEFINE_float("top_p", 1.0, "Sample from the smallest set of tokens with this much mass; 1: off.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")


def read_prompts(prompts, prompt_file):
    """The --prompt texts followed by the non-blank lines of `prompt_file`; DataError if none."""
    texts = list(prompts)
    if prompt_file:
        try:
            with open(prompt_file) as f:
                texts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise DataError(f"--prompt-file {prompt_file}: {e.strerror}") from None
    if not texts:
        raise DataError("no prompt: pass --prompt or --prompt-file")
    return texts


@exit_on_error
def main(argv):
    f = flags.FLAGS
    if not (f.temperature >= 0 and f.top_k >= 0 and 0 < f.top_p <= 1):
        raise DataError(f"--temperature must be >= 0, --top_k >= 0 and --top_p in (0, 1], got {f.temperature}, "
                        f"{f.top_k}, {f.top_p}")
    texts = read_prompts(f.prompt, f["prompt-file"].value)
    cfg, tok, graphdef, params, _ = run_lib.load_run_from_flags(argv)
    prompts, max_len = [tok.encode(t) for t in texts], f.max_len or cfg.data.seq_len
    check_prompts(prompts, max_len, f"--max_len={f.max_len}" if f.max_len else "data.seq_len, the default of --max_len")
    results, stats = generate(params, graphdef, prompts, f.max_new_tokens, tok.eos_id, max_len, f.temperature,
                              f.top_k, f.top_p, f.seed)
    for text, ids in zip(texts, results):
        print(text + tok.decode([int(i) for i in ids]))
    rate = stats["decode_tokens_per_s"]
    print(f"{len(texts)} prompt(s), {stats['prompt_tokens']} prompt tokens, {stats['new_tokens']} new tokens; "
          f"prefill + first token {stats['prefill_s']:.3f} s (compilation included); decode "
          f"{'-' if rate is None else f'{rate:.1f}'} tokens/s ({len(texts)} rows x {stats['decode_steps']} steps "
          f"in {stats['decode_s']:.3f} s, after the first step)", flush=True)

if __name__ == "__main__":
    define_flags()
    flags.adopt_module_key_flags(run_lib)  # --help: the run's flags too (--workdir, --step, --config)
    app.run(main, flags_parser=parse_flags)
