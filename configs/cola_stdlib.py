"""CoLA at a small size on the embedded stdlib corpus (long documents), packed: the row-shuffle check
of docs/data.md ("Row shuffle against uniform rows").

Recipe source: alvin-zyl/CoLA@91ff0d1 scripts/cola_scripts/cola130m.sh (lr 3e-3, 10 % warmup, cosine
to 0.1 lr, clip 0.5, weight decay 0.01, rows of 256 tokens). Differs in size so that it trains on a
CPU: d=256, 4 layers, rank 64, 16 rows a step, 300 steps, a 4096-piece BPE tokenizer of the corpus.
"""

from colax import config


def get_config():
    cfg = config.preset("cola", "tiny")
    cfg.model.update(vocab_size=4096, hidden_size=256, intermediate_size=688, num_heads=4, num_layers=4, rank=64)
    cfg.data.update(source="stdlib", seq_len=256, packing=True, tokenizer_vocab_size=4096)
    cfg.train.update(steps=300, batch_size=16, micro_batch_size=16, log_every=10, eval_every=150,
                     eval_batches=0, checkpoint_every=150, baseline_batches=0, sample_prompt="")
    cfg.optim.update(lr=0.003, warmup_steps=cfg.train.steps // 10, min_lr_ratio=0.1, grad_clip=0.5,
                     weight_decay=0.01)
    return cfg
