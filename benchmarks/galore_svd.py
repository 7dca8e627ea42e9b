"""What GaLore's projector refresh costs on an FSDP/tensor mesh, read off the compiled HLO.

  python benchmarks/galore_svd.py [--size 60m] [--meshes 1,8,1 1,4,2] [--rank R]

Runs on 8 simulated CPU devices (it sets XLA_FLAGS itself). For the full-rank preset at --size it
compiles the refresh alone (`colax.galore`'s SVD of every projected gradient stack, from the
parameters' shardings to the projectors' state shardings) twice: with the layer axis split over
fsdp, then fsdp x tensor, for the SVD (`svd_batch_fsdp`, `svd_batch`: what training does) and
without those constraints (GSPMD's own choice). Per device: the matrices each device factors, their SVD FLOPs (6mn² + 20n³ for
m >= n, the R-SVD count) and the bytes each device receives in the collectives of the compiled
program (`received_bytes`). Compile only: simulated CPU devices share cores, so no timings.
"""

import argparse
import math
import os
import re
import sys

import collectives


_SHAPE = re.compile(r"([a-z]+\d*)\[([\d,]*)\]")
_COLLECTIVE = re.compile(r"= (\(.*?\)|\S+) (all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)"
                         r"(?:-start)?\((%[^)]*)\)")


def _bytes(shapes):
    return sum(collectives._BYTES[t] * math.prod(int(d) for d in filter(None, dims.split(",")))
               for t, dims in _SHAPE.findall(shapes))


def received_bytes(hlo):
    """Bytes one device receives in the collectives of compiled HLO text: an all-gather's output
    minus its operand, (n-1)/n of an n-way all-to-all's operands, a collective-permute's operand,
    an all-reduce's operand twice (ring bound), a reduce-scatter's operand."""
    hlo = re.sub(r"/\*.*?\*/", "", hlo)
    sizes = {name: _bytes(f"{t}[{dims}]") for name, t, dims in collectives._DEF.findall(hlo)}
    total = 0
    for out, op, operands in _COLLECTIVE.findall(hlo):
        names = [o.strip().lstrip("%") for o in operands.split(",")]
        into = sum(sizes[n] for n in names)
        n = len(_SHAPE.findall(out))
        total += {"all-gather": _bytes(out) - into, "all-to-all": into * (n - 1) / max(n, 1),
                  "collective-permute": into, "all-reduce": 2 * into, "reduce-scatter": into}[op]
    return total


def svd_shapes(hlo):
    """(batch, m, n) of every SVD custom call in compiled HLO text."""
    return [tuple(map(int, m)) for m in re.findall(r"= \(f32\[(\d+),(\d+),(\d+)\][^\n]*custom-call\([^\n]*/svd", hlo)]


def refresh_cost(size, mesh_shape, rank, split):
    """{"svds", "flops", "bytes"} per device of one refresh of the preset on `mesh_shape`."""
    import jax
    import ml_collections
    from jax.sharding import NamedSharding

    from colax import config, galore, model, sharding, state
    from colax.projections import common
    from flax import nnx

    cfg = config.preset("galore", size)
    if rank:
        cfg.optim.rank = rank
    spec = config.validate(cfg)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(zip(sharding.AXES, mesh_shape))))
    params = nnx.to_pure_dict(nnx.state(model.abstract_model(spec)))
    grads = {k: v for k, v in params["blocks"].items() if k in common.PROJECTION_NAMES}
    tx = galore.scale_by_galore(cfg.optim.rank, 1, cfg.optim.scale)
    projector = jax.eval_shape(tx.init, grads).projector
    prefix = lambda tree: {"blocks": tree}  # the parameters' dict-key paths, for their logical axes
    shard = lambda tree: jax.tree_util.tree_map_with_path(
        lambda path, _: NamedSharding(mesh, sharding.logical_spec(state.param_logical_axes(path))), prefix(tree))
    factor = galore._factor
    if not split:
        galore._factor = lambda g, rank: galore.svd_projector(g, rank)
    try:
        fn = jax.jit(sharding.on_mesh(lambda g, p: galore._refresh(g["blocks"], p["blocks"], cfg.optim.rank), mesh),
                     in_shardings=(shard(grads), shard(projector)), out_shardings=shard(projector)["blocks"])
        hlo = fn.lower(prefix(grads), prefix(projector)).compile().as_text()
    finally:
        galore._factor = factor
    shapes = svd_shapes(hlo)
    flops = sum(b * (6 * max(m, n) * min(m, n) ** 2 + 20 * min(m, n) ** 3) for b, m, n in shapes)
    return dict(svds=sum(b for b, _, _ in shapes), flops=flops,
                bytes=received_bytes(hlo))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="60m")
    p.add_argument("--meshes", nargs="+", default=["1,8,1", "1,4,2", "1,2,4"], help="data,fsdp,tensor")
    p.add_argument("--rank", type=int, default=0, help="optim.rank (default: the preset's)")
    args = p.parse_args()
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    assert "jax" not in sys.modules
    print("| mesh (data, fsdp, tensor) | SVD layout | matrices factored per device | SVD GFLOPs per device "
          "| MiB received per device | x (FLOPs) | x (bytes) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for text in args.meshes:
        shape = tuple(int(x) for x in text.split(","))
        split, default = (refresh_cost(args.size, shape, args.rank, s) for s in (True, False))
        for name, row in (("layers split (training)", split), ("GSPMD default", default)):
            print(f"| {shape} | {name} | {row['svds']} | {row['flops'] / 1e9:.1f} | {row['bytes'] / 2**20:.1f} "
                  f"| {row['flops'] / split['flops']:.2f} | {row['bytes'] / max(split['bytes'], 1):.2f} |", flush=True)


if __name__ == "__main__":
    main()
