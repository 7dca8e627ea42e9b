"""SentencePiece tokenizers: load, train, and the `train` command line.

Trained tokenizers use the T5 id layout: pad=0, eos=1, unk=2, no bos, with
byte fallback and no text normalisation, so `decode(encode(s)) == s` for any
UTF-8 text (code and whitespace included).

  python -m colax.tokenizer train --source stdlib --vocab-size 8000 \\
      --model-type bpe --sample-docs 1000 --out /tmp/tok/stdlib8k
"""

from colax import errors

if __name__ == "__main__":  # Ctrl-C while the imports below load: one line, exit 130
    errors.exit_on_signal("interrupted")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Iterable  # noqa: E402
import dataclasses  # noqa: E402

from etils import epath  # noqa: E402
import sentencepiece as spm  # noqa: E402

from colax import data_config, progress, rows, sources  # noqa: E402
from colax import workdir as workdir_lib  # noqa: E402
from colax.errors import ConfigError, DataError  # noqa: E402

MODEL_NAME = "tokenizer.model"
# The paper's tokenizer: T5's SentencePiece model, 32000 pieces, pad 0, eos 1, unk 2 (the layout of
# the tokenizers trained here); the reference code loads it as `AutoTokenizer.from_pretrained("t5-base")`.
T5_URL = "https://huggingface.co/google-t5/t5-base/resolve/main/spiece.model"


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A loaded SentencePiece model; ids < 0 mean "not defined"."""
    sp: spm.SentencePieceProcessor
    path: str

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the serialized model (as SentencePiece writes a .model file)."""
        return hashlib.sha256(self.sp.serialized_model_proto()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


def load_tokenizer(path: str) -> Tokenizer:
    """Loads a SentencePiece `.model` file (local path or any epath URL)."""
    try:
        proto = epath.Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"tokenizer {path}: cannot load ({type(e).__name__}: {e.strerror or e})") from None
    return _from_proto(proto, path)


def _from_proto(proto: bytes, path) -> Tokenizer:
    """The Tokenizer of a serialized SentencePiece model; `path` names it in messages."""
    if not proto:  # SentencePiece takes b"" as a model without pieces (and logs "Model is not initialized")
        raise DataError(f"tokenizer {path}: cannot load (the file is empty)")
    try:
        sp = spm.SentencePieceProcessor(model_proto=proto)
    except (OSError, RuntimeError) as e:
        raise DataError(f"tokenizer {path}: cannot load ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})"
                       ) from None
    if sp.eos_id() < 0:
        raise DataError(f"tokenizer {path}: has no eos id")
    return Tokenizer(sp, str(path))


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
    """Raises ConfigError unless the model's vocab size equals the tokenizer's."""
    if vocab_size != tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={vocab_size} but tokenizer {tokenizer.path} has "
            f"{tokenizer.vocab_size} pieces")


def _train_proto(docs: Iterable[str], name: str, vocab_size: int, model_type: str,
                 sample_docs: int, say=print) -> bytes:
    """A serialized SentencePiece model trained on the first `sample_docs` docs (`name`: for errors);
    `say` gets the progress lines (`colax.progress`: the documents read, then the time taken)."""
    model, counter = io.BytesIO(), progress.Progress("tokenizer: training", say, total=sample_docs)

    def sample():
        for doc in itertools.islice(iter(docs), sample_docs):
            counter.add(documents=1)
            yield doc

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sample(),
            model_writer=model, vocab_size=vocab_size, model_type=model_type,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, split_digits=True,
            user_defined_symbols=["\n"], max_sentence_length=1 << 20,
            num_threads=2, minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"tokenizer training for {name}: "
                        f"{str(e).strip().splitlines()[-1]}") from None
    counter.done(f"{vocab_size} pieces")
    return model.getvalue()


def _write(tok: Tokenizer, proto: bytes) -> None:
    path = epath.Path(tok.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    workdir_lib.atomic_write(path, proto)


def train_tokenizer(docs: Iterable[str], out_prefix: str, vocab_size: int,
                    model_type: str = "bpe",
                    sample_docs: int = 1000) -> Tokenizer:
    """Trains on the first `sample_docs` docs; writes `out_prefix + ".model"`."""
    proto = _train_proto(docs, out_prefix, vocab_size, model_type, sample_docs)
    tok = _from_proto(proto, out_prefix + ".model")
    _write(tok, proto)
    return tok


def is_url(path: str) -> bool:
    """Whether `data.tokenizer` names a file to download (http/https) rather than to read."""
    return path.startswith(("http://", "https://"))


def download(url: str, dest) -> bytes:
    """The bytes at `url`; DataError (one line naming the file to fetch and where to place it) when
    they cannot be fetched, e.g. offline."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts
        reason = getattr(e, "reason", None) or e
        raise DataError(f"data.tokenizer: cannot download {url} ({reason}); offline, fetch that file "
                        f"elsewhere and place it at {dest}") from None


def find_or_train(cfg_data, workdir: str, vocab_size: int = 0, reuse: bool = True, sample=None):
    """(tokenizer, proto): `cfg_data.tokenizer` if a path; else `workdir/tokenizer.model` if present
    (a resumed run) and `reuse`; else for prepared data (`source="prepared"`) the folder's own
    tokenizer.model; else the http(s) URL `cfg_data.tokenizer` downloaded (the paper's
    T5 model, T5_URL); else a tokenizer of `cfg_data.tokenizer_vocab_size` pieces (0: `vocab_size`,
    the model's) trained on the train split (the held-out documents never shape the vocabulary):
    on `sample`, or if None on `sources.train_documents`.
    A prepared data's, downloaded or trained tokenizer comes with `proto`, its serialized model, not yet written to
    its path `workdir/tokenizer.model` (the caller writes it once every check has passed); else
    `proto` is None.
    """
    cached = epath.Path(workdir) / MODEL_NAME
    if cfg_data.tokenizer and not is_url(cfg_data.tokenizer):
        return load_tokenizer(cfg_data.tokenizer), None
    if reuse and cached.exists():
        return load_tokenizer(str(cached)), None
    if cfg_data.source == "prepared" and not cfg_data.tokenizer:  # the prepared data's own
        rows.read_manifest(cfg_data.path)  # a folder without a finished prepare: one line
        proto = load_tokenizer(os.path.join(cfg_data.path, rows.TOKENIZER)).sp.serialized_model_proto()
        return _from_proto(proto, cached), proto
    if cfg_data.tokenizer:
        proto = download(cfg_data.tokenizer, cached)
        return _from_proto(proto, cached), proto
    size = cfg_data.tokenizer_vocab_size or vocab_size
    if not size:
        raise ConfigError("data.tokenizer_vocab_size is 0 (the model's) but no model vocab size was given")
    workdir_lib.note(f"data: training a {size}-piece {cfg_data.tokenizer_model_type} tokenizer for {cached}")
    docs = sources.train_documents(cfg_data, cfg_data.tokenizer_sample_docs) if sample is None else sample
    proto = _train_proto(docs, str(cached), size, cfg_data.tokenizer_model_type, cfg_data.tokenizer_sample_docs,
                         workdir_lib.note)
    return _from_proto(proto, cached), proto


def get_or_train_tokenizer(cfg_data, workdir: str, vocab_size: int = 0) -> Tokenizer:
    """`find_or_train`, saving a downloaded or trained tokenizer into `workdir/tokenizer.model`, so a
    resumed run reuses it. With several hosts, train it once beforehand (CLI) and set `data.tokenizer`.
    """
    tok, proto = find_or_train(cfg_data, workdir, vocab_size)
    if proto is not None:
        _write(tok, proto)
    return tok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m colax.tokenizer")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a SentencePiece model on a source")
    t.add_argument("--source", default="stdlib",
                   choices=["stdlib", "text", "jsonl", "tfds", "hf"])
    t.add_argument("--path", default="", help="file/glob(s), comma-separated")
    t.add_argument("--doc-split", default="blank_line",
                   choices=["blank_line", "line"])
    t.add_argument("--text-field", default="text")
    t.add_argument("--tfds-name", default="c4/en:3.1.0")
    t.add_argument("--tfds-data-dir", default="")
    t.add_argument("--vocab-size", type=int, default=8000)
    t.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    t.add_argument("--sample-docs", type=int, default=1000)
    t.add_argument("--out", required=True, help="output prefix; writes OUT.model")
    args = p.parse_args(argv)
    cfg = data_config.defaults()
    cfg.update(source=args.source, path=args.path, doc_split=args.doc_split,
               text_field=args.text_field, tfds_name=args.tfds_name,
               tfds_data_dir=args.tfds_data_dir,
               tokenizer_vocab_size=args.vocab_size,
               tokenizer_model_type=args.model_type,
               tokenizer_sample_docs=args.sample_docs)
    try:
        data_config.validate(cfg)
        tok = train_tokenizer(sources.train_documents(cfg, args.sample_docs), args.out, args.vocab_size,
                              args.model_type, args.sample_docs)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {tok.path} ({tok.vocab_size} pieces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
