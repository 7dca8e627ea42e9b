"""Data pipeline tests: batch layout token by token, determinism, splits, hosts, resume, errors."""

import gzip
import itertools
import json
import os
import sys

import chex
import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from colax import data, rows, sources
from colax.errors import ConfigError, DataError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from data_pipeline import documents_per_batch, uniform_documents_per_batch  # noqa: E402

SHAKESPEARE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                           "tinyshakespeare", "input.txt")


class CharTokenizer:
    """a -> 3, b -> 4, ...; other characters map into [3, 100). pad 0, eos 1."""
    vocab_size, pad_id, eos_id, bos_id = 100, 0, 1, -1

    def encode(self, text):
        return [3 + (ord(c) - ord("a")) % 97 for c in text]


def _cfg(**kw):
    cfg = data.defaults()
    cfg.update(**kw)
    return cfg


@pytest.fixture
def corpus(tmp_path):
    """A text file of 40 blank-line-separated documents of different lengths."""
    docs = [f"document {i} " + "word " * (i % 7 * 20) for i in range(40)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs))
    return _cfg(source="text", path=str(path), val_docs=8, seq_len=16)


def _take(cfg, n, **kw):
    kw = dict(split="train", global_batch_size=4, process_index=0, process_count=1) | kw
    return list(itertools.islice(data.make_pipeline(cfg, CharTokenizer(), **kw), n))


def _fixed_docs(monkeypatch, docs):
    monkeypatch.setattr(sources, "document_dataset", lambda cfg, split: grain.MapDataset.source(docs))


def test_paper_mode_truncates_pads_and_masks(monkeypatch):
    _fixed_docs(monkeypatch, ["abc", "abcdefg"])
    b = _take(_cfg(seq_len=4, shuffle=False), 1, global_batch_size=2)[0]
    # "abc" -> 3 4 5 eos pad; "abcdefg" -> first 4 tokens then eos (kept, as the T5 tokenizer does).
    np.testing.assert_array_equal(b["inputs"], [[3, 4, 5, 1], [3, 4, 5, 6]])
    np.testing.assert_array_equal(b["targets"], [[4, 5, 1, 0], [4, 5, 6, 1]])
    np.testing.assert_array_equal(b["loss_mask"], [[1, 1, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 3], [0, 1, 2, 3]])
    chex.assert_trees_all_equal_dtypes(b, dict(inputs=np.int32(0), targets=np.int32(0),
                                               loss_mask=np.float32(0), segment_ids=np.int32(0),
                                               positions=np.int32(0)))


def test_paper_mode_padding_row_is_empty():
    row = data.empty_example(3)
    for k in ("inputs", "targets", "loss_mask", "segment_ids"):
        np.testing.assert_array_equal(row[k], [0, 0, 0])


def _fields(b, row=0):
    return tuple(b[k][row].tolist() for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions"))


class CountingTokenizer(CharTokenizer):
    """CharTokenizer that counts the documents it encodes."""

    def __init__(self):
        self.calls = 0

    def encode(self, text):
        self.calls += 1
        return super().encode(text)


def test_packed_split_is_packed_once_per_config_and_tokenizer(corpus):
    """A second pipeline of the same config, split and tokenizer (the final evaluation, the unigram
    baseline) reuses the rows packed for the first; another config or tokenizer packs again."""
    corpus.packing = True
    tok = CountingTokenizer()
    batches = lambda cfg, t: list(itertools.islice(data.make_pipeline(
        cfg, t, split="val", global_batch_size=4, process_index=0, process_count=1), 2))
    first = batches(corpus, tok)
    assert tok.calls == corpus.val_docs
    chex.assert_trees_all_equal(batches(corpus, tok), first)
    assert tok.calls == corpus.val_docs
    batches(corpus, CountingTokenizer())
    corpus.val_docs += 1
    batches(corpus, tok)
    assert tok.calls == 2 * corpus.val_docs - 1


def test_packing_rows_and_masks(monkeypatch):
    _fixed_docs(monkeypatch, ["abc", "de", "fghij"])
    cfg = _cfg(seq_len=4, shuffle=False, packing=True)
    # Stream: a b c EOS | d e EOS | f g h i j EOS, cut into rows of 5 tokens: 2 rows and a tail of 3.
    want = [  # inputs, targets, loss_mask, segment_ids, positions
        ([3, 4, 5, 1], [4, 5, 1, 6], [1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 2, 3]),
        ([7, 1, 8, 9], [1, 8, 9, 10], [1, 0, 1, 1], [1, 1, 2, 2], [0, 1, 0, 1]),
        ([11, 12, 1, 0], [12, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 2, 0]),  # the tail, padded
    ]
    train = _take(cfg, 3, global_batch_size=1)  # training drops the tail: the next epoch starts again
    assert [_fields(b) for b in train] == want[:2] + want[:1]
    assert [_fields(b) for b in _take(cfg, 5, split="val", global_batch_size=1)] == want


def test_colax_packer_makes_grains_concat_then_split_rows():
    # The streamed sources pack with grain; the row store with colax.rows: the same rows, token by token.
    rng = np.random.default_rng(0)
    docs = [rows.document_tokens(rng.integers(3, 100, n).tolist(), 1) for n in rng.integers(0, 40, 50)]
    grain_rows = list(grain.experimental.ConcatThenSplitIterDataset(
        grain.MapDataset.source([{"tokens": d} for d in docs]).to_iter_dataset(), length_struct={"tokens": 9}))
    colax_rows = [rows.packed_fields(r, 9, 1, 0) for r in rows.pack(docs, 9)]
    assert len(colax_rows) == len(grain_rows) == -(-sum(map(len, docs)) // 9)
    chex.assert_trees_all_equal(colax_rows, grain_rows)


def test_row_pieces_place_a_document_at_its_stream_offset():
    assert rows.row_pieces(7, 12, 5) == [(1, 2, 0, 3), (2, 0, 3, 8), (3, 0, 8, 12)]
    assert rows.row_pieces(10, 5, 5) == [(2, 0, 0, 5)] and rows.row_pieces(3, 0, 5) == []


@pytest.mark.parametrize("packing", [False, True])
def test_same_seed_same_batches_other_seed_differs(corpus, packing):
    corpus.packing = packing
    a, b = _take(corpus, 3), _take(corpus, 3)
    chex.assert_trees_all_equal(a, b)
    corpus.seed = 1
    c = _take(corpus, 3)
    assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


def test_train_val_disjoint_and_stable(corpus):
    docs = sources.read_documents(corpus)
    train, val = sources.split_documents(docs, 8)
    assert len(val) == 8 and len(train) == 32
    assert not set(train) & set(val) and set(train) | set(val) == set(docs)
    # Independent of file order and of the shuffle seed.
    assert set(sources.split_documents(docs[::-1], 8)[1]) == set(val)
    corpus.seed = 7
    assert list(sources.document_dataset(corpus, "val")) == val


def test_val_is_one_padded_pass(corpus):
    batches = _take(corpus, 100, split="val", global_batch_size=3)
    assert len(batches) == 3  # 8 documents -> 3 + 3 + 2 and one empty row
    assert batches[-1]["loss_mask"][2].sum() == 0 and batches[-1]["loss_mask"][1].sum() > 0


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("split", ["train", "val"])
def test_two_hosts_split_the_global_batch(corpus, split, packing):
    corpus.packing = packing
    whole = _take(corpus, 3, split=split)
    hosts = [_take(corpus, 3, split=split, global_batch_size=4, process_index=p, process_count=2)
             for p in (0, 1)]
    for k in range(len(whole)):
        for key in whole[k]:
            np.testing.assert_array_equal(
                np.concatenate([hosts[0][k][key], hosts[1][k][key]]), whole[k][key])
            assert hosts[0][k][key].shape == (2, 16)


def assert_resumes(cfg, global_batch_size, skip, take):
    """A train pipeline restored from its state after `skip` batches yields the same next `take`
    batches as the original; returns the skipped batches."""
    make = lambda: data.make_pipeline(cfg, CharTokenizer(), split="train", global_batch_size=global_batch_size,
                                      process_index=0, process_count=1)
    it = make()
    skipped = [next(it) for _ in range(skip)]
    state = it.get_state()
    expected = [next(it) for _ in range(take)]
    resumed = make()
    resumed.set_state(state)
    chex.assert_trees_all_equal([next(resumed) for _ in range(take)], expected)
    return skipped


@pytest.mark.parametrize("packing", [False, True])
def test_resume_from_saved_state(corpus, packing):
    corpus.packing = packing
    assert_resumes(corpus, 4, skip=2, take=3)


def test_training_rows_are_a_global_permutation_of_the_epochs_rows(corpus):
    corpus.update(packing=True)
    rows_of = lambda: [bytes(b["inputs"][0]) for b in _take(corpus, 10**4, global_batch_size=1, num_epochs=2)]
    shuffled = rows_of()
    corpus.shuffle = False
    in_order = rows_of()
    n = len(in_order) // 2
    assert in_order[:n] == in_order[n:] and shuffled[:n] != in_order[:n] and shuffled[:n] != shuffled[n:]
    assert sorted(shuffled[:n]) == sorted(in_order[:n]) == sorted(shuffled[n:])


@pytest.fixture
def long_documents(tmp_path):
    """600 documents of 100-1500 characters (4-47 rows of 32 tokens), one blank-line-separated file."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    docs = [f"doc {i} " + " ".join(rng.choice(words, n // 6)) for i, n in enumerate(rng.integers(100, 1500, 600))]
    path = tmp_path / "long.txt"
    path.write_text("\n\n".join(docs))
    return _cfg(source="text", path=str(path), val_docs=8, seq_len=32, packing=True)


def test_packed_batches_span_many_documents(long_documents):
    """A batch of 16 globally permuted rows spans as many documents as uniform sampling of the
    epoch's rows (~15); consecutive rows (no shuffle, the batching before the row shuffle) span ~2."""
    tok = CharTokenizer()
    mixed = documents_per_batch(long_documents, tok, batches=30, batch_size=16)
    uniform = uniform_documents_per_batch(long_documents, tok, batch_size=16, draws=300)
    long_documents.shuffle = False
    consecutive = documents_per_batch(long_documents, tok, batches=30, batch_size=16)
    assert mixed >= 14 and uniform >= 14 and abs(mixed - uniform) < 0.5 and consecutive < 4, (
        mixed, uniform, consecutive)


def test_epochs_reshuffle_and_end(corpus):
    batches = _take(corpus, 100, global_batch_size=8, num_epochs=2)
    assert len(batches) == 8  # 32 training documents x 2 epochs / 8
    first = np.concatenate([b["inputs"] for b in batches[:4]])
    second = np.concatenate([b["inputs"] for b in batches[4:]])
    assert not np.array_equal(first, second)
    assert sorted(map(bytes, first)) == sorted(map(bytes, second))


def test_jsonl_gzip_and_missing_field(tmp_path):
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(5)))
    cfg = _cfg(source="jsonl", path=str(tmp_path / "*.jsonl.gz"), val_docs=1)
    assert sorted(sources.read_documents(cfg)) == [f"doc {i}" for i in range(5)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: no string field 'text'"):
        sources.read_documents(_cfg(source="jsonl", path=str(bad)))


def test_val_path_is_the_validation_split(tmp_path):
    (tmp_path / "train.txt").write_text("one\n\ntwo\n\nthree")
    (tmp_path / "val.txt").write_text("four\n\nfive")
    cfg = _cfg(source="text", path=str(tmp_path / "train.txt"), val_path=str(tmp_path / "val.txt"), val_docs=2)
    assert list(sources.document_dataset(cfg, "train")) == ["one", "two", "three"]
    assert list(sources.document_dataset(cfg, "val")) == ["four", "five"]
    cfg.val_path = str(tmp_path / "nothing*.txt")
    with pytest.raises(DataError, match=r"data.val_path: no file matches '.*nothing\*.txt'"):
        sources.document_dataset(cfg, "val")
    with pytest.raises(ConfigError, match=r"data.val_path must be empty for source 'stdlib'"):
        data.validate(_cfg(val_path="v.txt"))


def test_line_split_and_bad_utf8(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n\nthree\n")
    (tmp_path / "b.txt").write_bytes(b"caf\xe9\n")
    cfg = _cfg(source="text", path=f"{tmp_path}/a.txt,{tmp_path}/b.txt", doc_split="line")
    assert sources.read_documents(cfg) == ["one", "two", "three"]
    cfg.on_bad_utf8 = "fail"
    with pytest.raises(DataError, match=r"b.txt: not UTF-8 at byte 3"):
        sources.read_documents(cfg)


def test_bad_input_errors(tmp_path):
    with pytest.raises(DataError, match=r"data.path: no file matches '.*missing.txt'"):
        sources.read_documents(_cfg(source="text", path=str(tmp_path / "missing.txt")))
    (tmp_path / "empty.txt").write_text("\n\n\n")
    with pytest.raises(DataError, match=r"no documents in source 'text'"):
        sources.read_documents(_cfg(source="text", path=str(tmp_path / "empty.txt")))
    with pytest.raises(DataError, match=r"data.val_docs=5 leaves no training documents"):
        sources.split_documents(["a", "b"], 5)
    with pytest.raises(ConfigError, match=r"data.seq_len must be >= 2, got 1"):
        data.validate(_cfg(seq_len=1))
    with pytest.raises(ConfigError, match=r"data.row_shuffle_window must be >= 0 \(0: no row shuffle\), got -1"):
        data.validate(_cfg(row_shuffle_window=-1))
    with pytest.raises(ConfigError, match=r"data.source must be one of"):
        data.validate(_cfg(source="c4"))
    with pytest.raises(ConfigError, match=r"data.path must be a file or glob for source 'jsonl'"):
        data.validate(_cfg(source="jsonl"))
    with pytest.raises(ConfigError, match=r"global batch size 5 must be divisible by the process count 2"):
        data.validate(_cfg(), 5, 2)


def test_hf_without_datasets_is_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError, as if absent
    with pytest.raises(DataError, match=r"pip install 'colax\[hf\]'"):
        data.make_pipeline(_cfg(source="hf"), CharTokenizer(), split="train", global_batch_size=2,
                           process_index=0, process_count=1)


def test_hf_offline_is_one_line_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def unreachable(name, *args, **kwargs):  # what datasets raises without a network, after its retries
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError) as e:
        data.make_pipeline(_cfg(source="hf"), CharTokenizer(), split="train", global_batch_size=2,
                           process_index=0, process_count=1)
    assert str(e.value).startswith("data.hf_name 'allenai/c4' (hf_config 'en', split 'train'): Couldn't reach")
    assert "--config.data.source=tfds" in str(e.value) and "\n" not in str(e.value)


def test_hf_streaming_local_files(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": "ab" * i}) for i in range(1, 9)))
    cfg = _cfg(source="hf", hf_name="json", hf_config="", path=str(tmp_path / "d.jsonl"),
               val_split="train", seq_len=4, hf_shuffle_buffer=4)
    (first,) = assert_resumes(cfg, 2, skip=1, take=2)
    assert first["inputs"].shape == (2, 4)
    val = list(data.make_pipeline(cfg, CharTokenizer(), split="val", global_batch_size=2,
                                  process_index=0, process_count=1))
    assert len(val) == 4


def test_hf_packed_rows_are_shuffled_and_resume(tmp_path):
    # The hf stream goes through the same row shuffle as the local sources; its state restores mid-window.
    pytest.importorskip("datasets")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": "ab" * i}) for i in range(1, 9)))
    cfg = _cfg(source="hf", hf_name="json", hf_config="", path=str(tmp_path / "d.jsonl"), seq_len=4,
               hf_shuffle_buffer=4, packing=True, row_shuffle_window=3)
    shuffled = assert_resumes(cfg, 2, skip=2, take=3)
    cfg.row_shuffle_window = 0
    consecutive = _take(cfg, 2, global_batch_size=2)
    assert not all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(shuffled, consecutive))


class ColaxTinyText(tfds.core.GeneratorBasedBuilder):
    """A 12 + 3 document text dataset written as array_record (no TensorFlow needed)."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(12, "t"), "validation": self._generate_examples(3, "v")}

    def _generate_examples(self, n, prefix):
        for i in range(n):
            yield i, {"text": f"{prefix}{i} " * (i + 1)}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    ColaxTinyText(data_dir=str(root), file_format="array_record").download_and_prepare()
    return str(root)


def test_tfds_array_record_source(tfds_dir):
    cfg = _cfg(source="tfds", tfds_name="colax_tiny_text:1.0.0", tfds_data_dir=tfds_dir, seq_len=8)
    assert sorted(sources.document_dataset(cfg, "val")) == ["v0 ", "v1 v1 ", "v2 v2 v2 "]
    batches = _take(cfg, 100, split="val", global_batch_size=2)
    assert len(batches) == 2 and batches[1]["segment_ids"][1].sum() == 0
    assert _take(cfg, 1, global_batch_size=4)[0]["inputs"].shape == (4, 8)


def test_tfds_packed_rows_are_window_shuffled_and_resume(tfds_dir):
    # tfds with packing is streamed (no row store): documents shuffled, packed, rows shuffled in windows.
    cfg = _cfg(source="tfds", tfds_name="colax_tiny_text:1.0.0", tfds_data_dir=tfds_dir, seq_len=8, packing=True,
               row_shuffle_window=3)
    shuffled = assert_resumes(cfg, 2, skip=2, take=3)  # saved 1 row into the second window
    cfg.row_shuffle_window = 0
    consecutive = _take(cfg, 2, global_batch_size=2)
    assert not all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(shuffled, consecutive))


def test_tfds_errors(tfds_dir, tmp_path):
    with pytest.raises(DataError, match=r"data.tfds_name 'no_such_dataset_xyz' .*not found"):
        sources.document_dataset(_cfg(source="tfds", tfds_name="no_such_dataset_xyz"), "train")
    # The same dataset, prepared as TFRecord: not readable without TensorFlow.
    version = tmp_path / "colax_tiny_text" / "1.0.0"
    version.mkdir(parents=True)
    src = os.path.join(tfds_dir, "colax_tiny_text", "1.0.0")
    for name in os.listdir(src):
        text = open(os.path.join(src, name), "rb").read()
        if name == "dataset_info.json":
            text = text.replace(b'"array_record"', b'"tfrecord"')
        (version / name.replace("array_record", "tfrecord")).write_bytes(text)
    cfg = _cfg(source="tfds", tfds_name="colax_tiny_text", tfds_data_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"TFRECORD is not supported.*array_record"):
        sources.document_dataset(cfg, "train")


def test_stdlib_corpus_is_sorted_python_sources():
    paths = sources.stdlib_paths()
    assert len(paths) > 300 and list(paths) == sorted(paths)
    assert all(p.endswith(".py") and f"{os.sep}test{os.sep}" not in p for p in paths)


def test_tinyshakespeare_blocks():
    if not os.path.exists(SHAKESPEARE):
        pytest.skip(f"shared data not found: {SHAKESPEARE}")
    docs = sources.read_documents(_cfg(source="text", path=SHAKESPEARE))
    assert len(docs) > 7000 and docs[0].startswith("First Citizen:")
