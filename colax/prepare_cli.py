"""`python -m colax.data prepare | verify`: prepared shards from the command line.

  python -m colax.data prepare --config configs/tiny.py --out DIR [--config.data.path=...]
      [--workers N] [--records_per_shard N] [--overwrite] [--runner=DirectRunner [-- BEAM_OPTIONS]]

tokenises the config's data section (`config.data`) once into DIR (`colax.prepare`); train on it
with `--config.data.source=prepared --config.data.path=DIR` (docs/data.md).

  python -m colax.data verify DIR

reads all of DIR's records and checks each shard's sha256 against the manifest (`rows.verify`).
"""

from absl import app, flags
from ml_collections import config_flags

from colax import config as config_lib
from colax import errors, prepare, rows

USAGE = ("usage: python -m colax.data prepare --config C --out DIR [--config.data.x=y] "
         "[--runner=R [-- BEAM_OPTIONS]] | verify DIR")

_CONFIG = config_flags.DEFINE_config_file("config", None, "prepare: a config file (configs/*.py): its data section.")
_OUT = flags.DEFINE_string("out", None, "prepare: the folder to write (manifest.json, tokenizer.model, shards).")
_WORKERS = flags.DEFINE_integer("workers", 0, "prepare: tokenising processes; 0: one per CPU.")
_PER_SHARD = flags.DEFINE_integer("records_per_shard", rows.RECORDS_PER_SHARD, "prepare: records per shard file.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "prepare: replace the prepared data in --out.")
_RUNNER = flags.DEFINE_string("runner", "", "prepare: tokenise in an Apache Beam pipeline on this runner "
                              "(DirectRunner, FlinkRunner, ...; the beam extra), its options after --; empty: "
                              "--workers processes.")


@errors.exit_on_error
def _main(argv):
    if argv[1:2] == ["verify"] and len(argv) == 3:
        return verify_command(argv[2])
    if argv[1:2] != ["prepare"] or (argv[2:] and not _RUNNER.value) or _OUT.value is None \
            or not flags.FLAGS[_CONFIG.name].present:
        raise app.UsageError(USAGE)
    errors.quiet_library_logs()
    write = None
    if _RUNNER.value:  # the optional beam extra: imported only when asked for (it raises without apache-beam)
        from colax import prepare_beam  # pylint: disable=g-import-not-at-top
        write = prepare_beam.writer(_RUNNER.value, argv[2:])
    manifest = prepare.prepare(config_lib.from_flag(_CONFIG), _OUT.value, _WORKERS.value, _PER_SHARD.value,
                               _OVERWRITE.value, write=write)
    counts = ", ".join(f"{split} {s['documents']:,} documents -> {s['rows']:,} rows in {len(s['shards'])} shard(s)"
                       for split, s in manifest["splits"].items())
    print(f"wrote {_OUT.value}: {manifest['rows']} rows of {manifest['seq_len']} tokens, {counts}", flush=True)


def verify_command(folder: str) -> None:
    """`python -m colax.data verify DIR`: `rows.verify`, then one line saying what was checked."""
    found = rows.verify(folder)
    what = ("sizes, sha256 checksums and records match the manifest" if found["checksums"] else
            "sizes and records match the manifest; the sha256 checksums were not checked: this manifest, of an "
            "earlier colax, has none (prepare again to record them)")
    print(f"verified {folder}: {found['shards']} shards, {found['records']:,} records, {found['tokens']:,} tokens: "
          f"{what}", flush=True)


def main() -> None:
    """Runs the command line (module docstring)."""
    app.run(_main, flags_parser=errors.parse_flags)
