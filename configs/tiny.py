"""A tiny CoLA model that trains on a 2-core CPU in minutes (the README's demo, `make demo`).

Data: the embedded Python-stdlib corpus, packed into 128-token rows, with a SentencePiece tokenizer
of model.vocab_size (2048) pieces trained into the workdir on first use. docs/training.md has the
measured wall time and perplexities.
"""

from colax import config


def get_config():
    cfg = config.preset("cola", "tiny")
    cfg.model.vocab_size = 2048
    cfg.data.update(source="stdlib", seq_len=128, packing=True, tokenizer_sample_docs=300)
    cfg.optim.warmup_steps = 50
    cfg.train.update(steps=500, batch_size=32, micro_batch_size=16, eval_every=50, eval_batches=8,
                     log_every=10, checkpoint_every=100, sample_tokens=64, sample_temperature=0.7)
    return cfg
