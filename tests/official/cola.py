"""CoLA's LLaMA forward as the authors' code computes it, in torch (the `parity` extra).

Transcribed from alvin-zyl/CoLA@91ff0d10809181c6ca430a596c18aea3590cbd24 (cited as `CoLA@91ff0d1:path:line`):
`cola/cola_layer.py` (the projection) and `cola/modeling_cola.py` (the attention, eager or sdpa, the
decoder layer and the causal LM). Weights are a dict keyed as the authors' state dict
(`model.layers.{i}.self_attn.q_proj.cola_a` ...), which `colax.convert.to_tensors(params, "cola")`
writes. No biases (`attention_bias = mlp_bias = False`, CoLA@91ff0d1:cola/configuration_cola.py:29-31),
no dropout (`attention_dropout = 0`, ibid. :30), one key/value head per query head.
"""

import math

ATTN = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
MLP = {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def init_factors(torch, in_features, out_features, rank, generator=None):
    """(cola_a [in, r], cola_b [r, out]) as ColaLayer.__init__ draws them (CoLA@91ff0d1:cola/cola_layer.py:25-31)."""
    target_sdv = (in_features + out_features) ** (-1 / 2)  # :25
    a = torch.randn(in_features, rank, generator=generator) / rank ** (1 / 4) * target_sdv ** (1 / 2)  # :26-28
    b = torch.randn(rank, out_features, generator=generator) / rank ** (1 / 4) * target_sdv ** (1 / 2)  # :29-31
    return a, b


def cola_layer(torch, x, w, key):
    """ColaLayer.forward (CoLA@91ff0d1:cola/cola_layer.py:46-57): silu(x @ cola_a) @ cola_b. lr_act is
    always on: no call site passes lr_act=False (modeling_cola.py:239-259, :316-343), so down and o
    have the SiLU too."""
    return cola_up(torch, cola_down(torch, x, w, key), w, key)


def cola_down(torch, x, w, key):
    """The r-wide half of ColaLayer.forward: silu(x @ cola_a) (CoLA@91ff0d1:cola/cola_layer.py:47-50;
    CoLA-M's ColaMDownProjLayer)."""
    out = torch.matmul(x, w[f"{key}.cola_a"])  # :47
    return torch.nn.functional.silu(out)  # :49-50, ACT2FN["silu"]


def cola_up(torch, h, w, key):
    """The other half: h @ cola_b (CoLA@91ff0d1:cola/cola_layer.py:52; CoLA-M's ColaMUpProjLayer)."""
    return torch.matmul(h, w[f"{key}.cola_b"])  # :52


def rms_norm(torch, x, weight, eps):
    """LlamaRMSNorm.forward (CoLA@91ff0d1:cola/modeling_cola.py:56-61)."""
    x32 = x.to(torch.float32)  # :58
    variance = x32.pow(2).mean(-1, keepdim=True)  # :59
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)  # :60-61


def rope(torch, q, k, head_dim, seq_len, theta):
    """Default RoPE (modeling_cola.py:143-171, inv_freq from transformers' default rope init) and
    apply_rotary_pos_emb with rotate_half (:199-230). q, k: [B, N, T, H]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(seq_len).float()[:, None] * inv_freq[None, :]  # :160-162
    emb = torch.cat((freqs, freqs), dim=-1)  # :163
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]  # :164-165, unsqueeze_dim=1 (:226-227)
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # :171

    def rotate_half(x):  # :199-203
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin  # :228-229


def attention(torch, h, w, prefix, num_heads, theta, kernel="eager"):
    """ColaAttention.forward (CoLA@91ff0d1:cola/modeling_cola.py:362-429, eager; ColaSdpaAttention,
    :571-679, sdpa), causal mask."""
    q, k, v = (cola_layer(torch, h, w, f"{prefix}.{ATTN[p]}") for p in ("q", "k", "v"))  # :367-369
    heads = causal_attention(torch, q, k, v, num_heads, theta, kernel)
    return cola_layer(torch, heads, w, f"{prefix}.{ATTN['o']}")  # :429


def causal_attention(torch, q, k, v, num_heads, theta, kernel="eager"):
    """The heads of ColaAttention.forward between its projections (CoLA@91ff0d1:cola/modeling_cola.py:
    371-428): q, k, v [B, T, D] -> [B, T, D]. kernel "eager": the explicit softmax of ColaAttention;
    "sdpa": ColaSdpaAttention's torch.nn.functional.scaled_dot_product_attention with is_causal
    (:663-672; no mask reaches it, :1104-1115), the class the authors' models get by default:
    `LLAMA_ATTENTION_CLASSES[config._attn_implementation]` (:682-694), which transformers'
    PreTrainedModel sets to "sdpa" for a model with `_supports_sdpa = True` (:805)."""
    bsz, q_len, hidden = q.shape
    head_dim = hidden // num_heads  # :309
    q, k, v = (t.view(bsz, q_len, num_heads, head_dim).transpose(1, 2) for t in (q, k, v))  # :371-379
    q, k = rope(torch, q, k, head_dim, q_len, theta)  # :388-393
    if kernel == "sdpa":
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # :665-672
        return out.transpose(1, 2).reshape(bsz, q_len, -1)  # :674-675
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(head_dim)  # :404-406
    mask = torch.full((q_len, q_len), float("-inf")).triu(1)  # the causal mask added at :408-410
    probs = torch.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype)  # :413-415
    return torch.matmul(probs, v).transpose(1, 2).reshape(bsz, q_len, -1)  # :419, :427-428


def mlp(torch, h, w, prefix, only_lr_act):
    """ColaMLP.forward (CoLA@91ff0d1:cola/modeling_cola.py:264-275)."""
    gate = cola_layer(torch, h, w, f"{prefix}.{MLP['gate']}")
    up = cola_layer(torch, h, w, f"{prefix}.{MLP['up']}")
    if not only_lr_act:
        gate = torch.nn.functional.silu(gate)  # :268-271, act_fn = ACT2FN["silu"] (:261-262)
    return cola_layer(torch, gate * up, w, f"{prefix}.{MLP['down']}")  # :269-273


def forward(torch, w, tokens, num_layers, num_heads, only_lr_act, eps=1e-6, theta=10000.0, kernel="eager"):
    """ColaForCausalLM logits (CoLA@91ff0d1:cola/modeling_cola.py): tokens int64 [B, T] -> [B, T, V].

    Embedding (:978), decoder layers (:742-764: pre-norm attention and MLP, each added to the
    residual), final norm (:1060), untied lm_head (:1233, :1347; tie_word_embeddings=False,
    configuration_cola.py:26). eps: rms_norm_eps of cola_configs/*.json (1e-06). kernel: the
    attention's, as `causal_attention`."""
    x = w["model.embed_tokens.weight"][tokens]
    for i in range(num_layers):
        p = f"model.layers.{i}"
        h = rms_norm(torch, x, w[f"{p}.input_layernorm.weight"], eps)  # :744
        x = x + attention(torch, h, w, p, num_heads, theta, kernel)  # :747-758
        h = rms_norm(torch, x, w[f"{p}.post_attention_layernorm.weight"], eps)  # :762
        x = x + mlp(torch, h, w, p, only_lr_act)  # :763-764
    x = rms_norm(torch, x, w["model.norm.weight"], eps)
    return x @ w["lm_head.weight"].T
