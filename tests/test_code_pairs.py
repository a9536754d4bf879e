"""The shipped code-search pairs, the script that builds them, and the tokenized Dataset."""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from compressor.core.errors import CompressorError
from compressor.data import build_code_pairs as build
from compressor.data.code_pairs import (
    DATA_FILE,
    SPLITS,
    CodePairs,
    DataError,
    PairCollator,
    code_pairs_header,
    load_code_pairs,
)

THIS_PYTHON = ".".join(str(v) for v in sys.version_info[:3])


@pytest.fixture(scope="module")
def shipped() -> list[dict]:
    with gzip.open(DATA_FILE, "rt", encoding="ascii") as f:
        return [json.loads(line) for line in f][1:]


def test_shipped_file_header_counts_and_licence(shipped):
    header = code_pairs_header()
    assert header["format"] == build.FORMAT
    assert header["rules"] == build.rules()
    counts = Counter(p["split"] for p in shipped)
    assert header["counts"] == {s: counts[s] for s in SPLITS}
    assert header["counts"]["test"] >= 1000  # the dense model ranks against at least 1,000 documents
    assert {s: len(load_code_pairs(s)) for s in SPLITS} == header["counts"]
    assert DATA_FILE.stat().st_size < 4 * 2**20
    notice = DATA_FILE.with_name("NOTICE").read_text()
    assert "Python Software Foundation" in notice and header["python"] in notice
    assert (
        "This LICENSE AGREEMENT is between the Python Software Foundation"
        in DATA_FILE.with_name("LICENSE-PSF.txt").read_text()
    )


def test_shipped_pairs_follow_the_rules(shipped):
    names = [f"{p['module']}:{p['qualname']}" for p in shipped]
    assert len(set(names)) == len(names)
    assert max(Counter(p["query"] for p in shipped).values()) == 1
    assert max(Counter(p["document"] for p in shipped).values()) == 1
    for p in shipped:
        assert p["split"] == build.split_of(p["module"], p["qualname"])
        assert len(p["query"].split()) >= build.MIN_QUERY_WORDS
        assert len(p["query"]) <= build.MAX_QUERY_CHARS
        assert p["query"] == " ".join(p["query"].split())
        lines = p["document"].split("\n")
        assert len(lines) <= build.MAX_DOC_LINES and len(p["document"]) <= build.MAX_DOC_CHARS
        assert lines[0].lstrip().startswith(("def ", "async def "))
        assert all(line.strip() for line in lines)
        assert not any(part in {"site-packages", "turtledemo"} for part in p["module"].split("."))
    share = Counter(p["split"] for p in shipped)
    assert 0.6 < share["train"] / len(shipped) < 0.8  # 70/10/20 by hash
    assert 0.15 < share["test"] / len(shipped) < 0.25


def test_split_is_a_stable_hash_of_the_name():
    # Independent recomputation of the rule: sha256("module:qualname")[:8], big-endian, mod 100.
    for name in ["json:dumps", "textwrap:TextWrapper.wrap", "a.b:C.d", "x:y"]:
        bucket = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % 100
        expected = "train" if bucket < 70 else "validation" if bucket < 80 else "test"
        assert build.split_of(*name.split(":")) == expected


def test_rebuild_of_a_subset_is_byte_identical_and_agrees_with_the_shipped_file(shipped):
    modules = ["json", "textwrap", "csv", "shlex", "string"]
    first = build.build(modules=modules)
    again = build.build(modules=modules)
    assert first and build.encode(first, modules) == build.encode(again, modules)
    header = json.loads(gzip.decompress(build.encode(first, modules)).split(b"\n", 1)[0])
    assert header["modules"] == sorted(modules) and header["python"] == THIS_PYTHON
    if code_pairs_header()["python"] != THIS_PYTHON:
        pytest.skip("the shipped pairs were built with another Python's standard library")
    # Dedupe over the whole library drops at least what it drops over a subset: shipped <= subset.
    ours = {(p["module"], p["qualname"]): p for p in first}
    theirs = [p for p in shipped if p["module"].split(".")[0] in modules]
    assert len(theirs) >= 0.8 * len(ours)
    for p in theirs:
        assert ours[(p["module"], p["qualname"])] == p


def test_first_sentence():
    assert build.first_sentence("Return the sum.  Then more.\n\nDetails.") == "Return the sum."
    assert build.first_sentence("Split the\n   string on x!  Also y.") == "Split the string on x!"
    assert build.first_sentence("No full stop here\n\nSecond paragraph.") == "No full stop here"
    assert build.first_sentence("Use os.path.join here. Next.") == "Use os.path.join here."
    assert build.first_sentence("Quote a value (e.g. a path). Then more.") == "Quote a value (e.g. a path)."
    assert build.first_sentence("Same, i.e. twice") == "Same, i.e. twice"
    assert build.first_sentence("Names, files, etc. Then more.") == "Names, files, etc."


FAKE_MODULE = '''
def kept(a, b):
    """Add the two numbers and return them.

    More text that is not part of the query.
    """
    total = a + b
    return total

def short(x):
    """Too short."""
    return x

def on_def_line(x): "Docstring on the def line is skipped here."; return x

def trivial(self):
    """This one has a trivial body only."""
    pass

class Box:
    @property
    def size(self):
        """Return the number of items in the box."""
        return len(self.items)

    @size.setter
    def size(self, value):
        """Second definition of the same name is skipped."""
        self.items = [None] * value

    def outer(self):
        """Outer method with a nested helper inside."""
        def inner():
            """Nested functions are not pairs of their own."""
            return 1
        return inner()

def same_query_a():
    """This query text appears twice in the library."""
    return 1

def same_query_b():
    """This query text appears twice in the library."""
    return 2
'''


def test_extraction_rules_on_a_fake_library(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text(FAKE_MODULE)
    for skipped in ["site-packages/other", "turtledemo", "config-3.11-x86_64"]:
        (root / skipped).mkdir(parents=True)
        (root / skipped / "mod.py").write_text(FAKE_MODULE)
    (root / "test").mkdir()
    (root / "test" / "test_mod.py").write_text(
        'def check():\n    """Check that the sum is right."""\n    assert 1 + 1 == 2\n'
    )
    (root / "broken.py").write_text("def f(:\n")
    pairs = build.build(root)
    by_name = {(p["module"], p["qualname"]): p for p in pairs}
    assert set(by_name) == {
        ("pkg", "kept"),
        ("pkg", "Box.size"),
        ("pkg", "Box.outer"),
        ("test.test_mod", "check"),
    }, sorted(by_name)
    kept = by_name[("pkg", "kept")]
    assert kept["query"] == "Add the two numbers and return them."
    assert kept["document"] == "def kept(a, b):\n    total = a + b\n    return total"
    assert kept["lineno"] == 2
    assert by_name[("pkg", "Box.size")]["document"] == "def size(self):\n    return len(self.items)"
    assert "def inner" in by_name[("pkg", "Box.outer")]["document"]
    assert by_name[("test.test_mod", "check")]["query"] == "Check that the sum is right."


def test_document_cap(tmp_path, monkeypatch):
    body = "\n".join(f"    x{i} = {i}" for i in range(50))
    root = tmp_path / "lib"
    root.mkdir()
    (root / "m.py").write_text(f'def long():\n    """Set fifty variables one by one."""\n{body}\n')
    (doc,) = [p["document"] for p in build.build(root)]
    assert doc.split("\n") == ["def long():"] + [f"    x{i} = {i}" for i in range(build.MAX_DOC_LINES - 1)]
    monkeypatch.setattr(build, "MAX_DOC_CHARS", 40)
    (doc,) = [p["document"] for p in build.build(root)]
    assert doc == "def long():\n    x0 = 0\n    x1 = 1"  # cut at the last line break within 40


def test_build_rejects_a_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build.build(tmp_path / "nope")


# ----- the Dataset and its collate function, with a tiny tokenizer built here -----

WORDS = [
    *("def", "return", "the", "self", "x", "a", "b", "of", "and"),
    *("to", "add", "numbers", "two", "sum", "split", "string", "total", "value"),
]


@pytest.fixture
def tiny_tokenizer_dir(tmp_path) -> Path:
    transformers = pytest.importorskip("transformers")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "(", ")", ":", "=", "+", ".", ",", *WORDS]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"), do_lower_case=True)
    out = tmp_path / "tok"
    tok.save_pretrained(out)
    return out


@pytest.fixture
def small_file(tmp_path) -> Path:
    words = WORDS * 3
    pairs = []
    for i in range(36):
        query = " ".join(words[i % 7 : i % 7 + 4 + i % 5])
        document = "def f(x):\n    return " + " + ".join(words[: 1 + i % 9])
        pairs.append({"module": "m", "qualname": f"f{i}", "lineno": i, "query": query, "document": document})
        pairs[-1]["split"] = SPLITS[i % 3]
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(build.encode(pairs))
    return path


def test_dataset_and_collate_pad_to_longest_and_truncate(tiny_tokenizer_dir, small_file):
    ds = CodePairs("train", tokenizer=tiny_tokenizer_dir, max_length=8, path=small_file)
    assert len(ds) == 12
    assert set(ds[0]) == {"query", "document"} and all(isinstance(v, str) for v in ds[0].values())
    batches = list(DataLoader(ds, batch_size=5, collate_fn=ds.collate))
    assert [b["query"]["input_ids"].shape[0] for b in batches] == [5, 5, 2]
    for b in batches:
        for side in ("query", "document"):
            ids, mask = b[side]["input_ids"], b[side]["attention_mask"]
            assert ids.dtype == mask.dtype == torch.int64 and ids.shape == mask.shape
            assert ids.shape[1] <= 8
            assert mask.sum(1).max() == ids.shape[1]  # padded to the longest in the batch
            assert torch.all(ids[mask == 0] == 0)  # [PAD] is id 0
            assert torch.all(ids[:, 0] == 2)  # [CLS]
    long = PairCollator(tiny_tokenizer_dir, max_length=64)([ds[i] for i in range(5)])
    assert long["document"]["input_ids"].shape[1] > 8  # without the cap the documents are longer
    # A tokenizer object works as well as its directory.
    direct = CodePairs("train", tokenizer=ds.collator.tokenizer, max_length=8, path=small_file)
    items = [ds[i] for i in range(4)]
    a, b = direct.collate(items), ds.collate(items)
    assert all(torch.equal(a[s][k], b[s][k]) for s in a for k in a[s])


def test_dataset_limit_and_errors(tiny_tokenizer_dir, small_file, tmp_path):
    assert len(CodePairs("validation", path=small_file, limit=3)) == 3
    with pytest.raises(DataError, match="unknown split 'dev'"):
        CodePairs("dev", path=small_file)
    with pytest.raises(DataError, match="without a tokenizer"):
        CodePairs("train", path=small_file).collate([{"query": "a", "document": "b"}])
    with pytest.raises(DataError, match="does not exist"):
        CodePairs("train", path=tmp_path / "missing.jsonl.gz")
    with pytest.raises(DataError, match=r"tokenizer directory .* does not exist"):
        CodePairs("train", tokenizer=tmp_path / "no_model", path=small_file)
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(DataError, match="no usable tokenizer"):
        CodePairs("train", tokenizer=tmp_path / "empty_model", path=small_file)
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"format": "other"}\n'))
    with pytest.raises(DataError, match="expected a first line with format"):
        load_code_pairs("train", bad)
    (tmp_path / "plain.jsonl.gz").write_text("not gzip")
    with pytest.raises(DataError, match="not gzip of JSON lines"):
        load_code_pairs("train", tmp_path / "plain.jsonl.gz")
    with pytest.raises(DataError, match="'query' and 'document'") as info:
        PairCollator(tiny_tokenizer_dir)([{"query": "a"}])
    assert isinstance(info.value, CompressorError)


def test_module_docstring_usage_runs(tiny_tokenizer_dir):
    pairs = CodePairs("train", tokenizer=tiny_tokenizer_dir, limit=40)
    batch = next(iter(DataLoader(pairs, batch_size=32, shuffle=True, collate_fn=pairs.collate)))
    assert batch["query"]["input_ids"].shape[0] == 32
    assert batch["document"]["input_ids"].shape[1] <= 128
    assert textwrap.dedent(pairs[0]["document"]) == pairs[0]["document"]
