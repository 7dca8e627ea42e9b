"""Temp memory and training FLOPs of every remat policy, 60M..7B, as one markdown table.

    python benchmarks/remat_table.py [--sizes 60m,1b] [--kinds cola,crnet,llama] [--policies none,crnet]
        [--out remat_table.md]

CoLA rows for every CoLA policy, CR-Net rows for none, full and crnet, full-rank rows for none and
full (`--policies` keeps a subset; `none`, the ratio base, always runs), at the configs' micro-batch
(32 x 256, bf16 compute). Ratios are against `none` of the same model. Numbers are XLA's compiled
estimates on the machine that runs it (see docs/remat.md).
"""

from absl import app, flags

from colax import config, plan, remat

_SIZES = flags.DEFINE_list("sizes", ["60m", "130m", "350m", "1b", "7b"], "Paper sizes to measure.")
_KINDS = flags.DEFINE_list("kinds", ["cola", "crnet", "llama"], "Presets to measure.")
_POLICIES = flags.DEFINE_list("policies", list(remat.POLICIES), "Remat policies to measure (none always).")
_OUT = flags.DEFINE_string("out", "remat_table.md", "Markdown file to write.")


def applies(kind, policy):
    """Whether remat `policy` is meant for preset `kind`: CR-Net's inverting policy for crnet only,
    the CoLA-tag policies for cola only, none and full for all."""
    p = remat.POLICIES[policy]
    return kind == "crnet" if p.inverts else kind == "cola" if p.lowrank else True


def rows(size):
    """One dict per (kind, policy) for paper size `size`."""
    for kind in _KINDS.value:
        cfg = config.preset(kind, size)
        names = [n for n in remat.POLICIES if applies(kind, n) and (n == "none" or n in _POLICIES.value)]
        measured = [plan.remat_row(cfg, name) for name in names]
        base = measured[0]
        tokens = cfg.train.micro_batch_size * cfg.data.seq_len
        for row in measured:
            yield dict(size=size, kind=kind, base=base, tokens=tokens, **row)


def markdown(table):
    lines = ["| size | model | remat | temp GiB | x none | GFLOPs/token | x none | saved/block/token | note |",
             "|---|---|---|---:|---:|---:|---:|---|---|"]
    for r in table:
        lines.append(
            f"| {r['size']} | {r['kind']} | {r['remat']} | {r['temp_bytes'] / 2**30:.2f} | "
            f"{r['temp_bytes'] / r['base']['temp_bytes']:.2f} | {r['xla_flops_per_step'] / r['tokens'] / 1e9:.3f} | "
            f"{r['xla_flops_per_step'] / r['base']['xla_flops_per_step']:.3f} | {r['saved_values_formula']} | "
            f"{r.get('note', '')} |")
    return "\n".join(lines)


def main(argv):
    del argv
    text = markdown([r for size in _SIZES.value for r in rows(size)])
    print(text)
    with open(_OUT.value, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
