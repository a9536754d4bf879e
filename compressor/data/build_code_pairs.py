"""Build the code-search pairs shipped as ``code_pairs.jsonl.gz`` from the CPython standard library.

Each pair is one documented function of the standard library's Python source (the one installed with
the interpreter that runs this script, ``sysconfig.get_paths()["stdlib"]``):

- query: the first sentence of the function's docstring (whitespace collapsed);
- document: the function's source code (its ``def`` line, signature and body, decorators left out)
  with the docstring's lines removed, dedented, blank lines dropped, then capped at ``MAX_DOC_LINES``
  lines and ``MAX_DOC_CHARS`` characters (cut at the last line break before the cap).

The code is the document (not the rest of the docstring) because most standard-library docstrings are
a single sentence, so "the rest of the docstring" would leave most functions without a document, and
because finding code from a one-sentence description is the task people run a code-search encoder for.

Rules, applied in this order (all deterministic; the output depends only on the source tree):

1. Files: every ``*.py`` under the root, walked in sorted order of their relative path, except those
   under a folder named in ``SKIP_DIRS`` (site-packages: third-party code under other licences; the
   turtle demos) or starting with ``config-`` (build configuration). The test suite and IDLE are
   kept: without them fewer than 1,000 pairs would land in the test split. A file that does not
   parse (the test suite's deliberately broken files) is skipped.
2. Functions: ``def`` and ``async def`` at module level and in classes (nested in classes at any
   depth), not functions defined inside functions. Qualified name as Python's ``__qualname__`` (e.g.
   ``JSONEncoder.encode``). A second function with the same module and qualified name (a property
   setter, a definition under ``if``/``else``) is skipped: the first in source order is kept.
3. Query: the docstring's first paragraph with whitespace collapsed, cut after the first ``.``, ``!``
   or ``?`` that is followed by whitespace or ends the paragraph, except the full stops of
   ``NOT_SENTENCE_ENDS`` (e.g., i.e., cf., vs.). Kept when it has at least
   ``MIN_QUERY_WORDS`` words and at most ``MAX_QUERY_CHARS`` characters, and no doctest prompt
   (``>>>``).
4. Document: the docstring must sit on lines of its own (not on the ``def`` line); what is left after
   removing its lines must have at least ``MIN_DOC_BODY_LINES`` non-blank lines after the signature,
   and not be a body of only ``pass``, ``...`` or ``raise NotImplementedError``.
5. Dedupe: a query text or a document text that occurs in more than one pair is ambiguous as a
   retrieval target, so every pair that shares it is dropped (not only the later copies).
6. Split: ``sha256("module:qualname")``'s first 8 bytes as a big-endian integer, modulo 100: below 70
   train, below 80 validation, else test (70/10/20: the test split needs at least 1,000 documents to
   rank against). A pair's split depends on its own name alone, so adding or
   removing other pairs never moves it.

Output: gzip (mtime 0, no file name, level 9) of JSON lines, ASCII-escaped, keys sorted. The first
line is a header ``{"format": FORMAT, "python": ..., "rules": {...}, "counts": {...}}``; every other
line is ``{"document", "lineno", "module", "qualname", "query", "split"}``, in file then source order.
Running this script again with the same Python on the same standard library gives the same bytes.

The standard library is the Python Software Foundation's, under the PSF License Agreement; its text
ships beside the data as ``LICENSE-PSF.txt`` and ``NOTICE`` says what was taken.

Usage: ``python -m compressor.data.build_code_pairs [--stdlib DIR] [--output FILE] [--module NAME ...]``.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import io
import json
import re
import sys
import sysconfig
import textwrap
import tokenize
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

FORMAT = "compressor.code_pairs/1"
SKIP_DIRS = ("site-packages", "lib-dynload", "ensurepip", "turtledemo", "__pycache__")
SKIP_DIR_PREFIXES = ("config-",)
#: Abbreviations whose full stop does not end a sentence.
NOT_SENTENCE_ENDS = ("e.g.", "i.e.", "cf.", "vs.")
MIN_QUERY_WORDS = 4
MAX_QUERY_CHARS = 300
MIN_DOC_BODY_LINES = 1
MAX_DOC_LINES = 30
MAX_DOC_CHARS = 1200
SPLIT_EDGES = (("train", 70), ("validation", 80), ("test", 100))
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_TRIVIAL_BODY = re.compile(r"^(pass|\.\.\.|raise NotImplementedError(\(.*\))?)$")


def rules() -> dict[str, Any]:
    """The constants that define the pairs, as recorded in the data file's header."""
    return {
        "skip_dirs": list(SKIP_DIRS),
        "skip_dir_prefixes": list(SKIP_DIR_PREFIXES),
        "not_sentence_ends": list(NOT_SENTENCE_ENDS),
        "min_query_words": MIN_QUERY_WORDS,
        "max_query_chars": MAX_QUERY_CHARS,
        "min_doc_body_lines": MIN_DOC_BODY_LINES,
        "max_doc_lines": MAX_DOC_LINES,
        "max_doc_chars": MAX_DOC_CHARS,
        "split": "sha256('module:qualname')[:8] big-endian mod 100: <70 train, <80 validation, else test",
        "document": "function source without decorators and docstring lines, dedented, capped",
        "dedupe": "drop every pair whose query or document text occurs more than once",
    }


def default_stdlib() -> Path:
    """The standard library folder of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(module: str, qualname: str) -> str:
    """The fixed split ("train", "validation" or "test") of the function ``module:qualname``."""
    digest = hashlib.sha256(f"{module}:{qualname}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    for name, edge in SPLIT_EDGES:
        if bucket < edge:
            return name
    raise AssertionError("unreachable: the last edge is 100")


def first_sentence(docstring: str) -> str:
    """The first sentence of a cleaned docstring's first paragraph, whitespace collapsed."""
    paragraph = docstring.strip().split("\n\n", 1)[0]
    text = " ".join(paragraph.split())
    for match in _SENTENCE_END.finditer(text):
        if not text[: match.end()].lower().endswith(NOT_SENTENCE_ENDS):
            return text[: match.end()]
    return text


def module_name(relative: Path) -> str:
    """The dotted module name of a file path relative to the library root (``a/b/__init__.py``: ``a.b``)."""
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files(root: Path, modules: Sequence[str] | None = None) -> Iterator[tuple[str, Path]]:
    """(module name, path) of each source file kept by rule 1, in sorted order of relative path.

    ``modules``: if given, only these top-level modules or packages (e.g. ``["json", "csv"]``).
    """
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        relative = path.relative_to(root)
        folders = relative.parts[:-1]
        if any(f in SKIP_DIRS or f.startswith(SKIP_DIR_PREFIXES) for f in folders):
            continue
        name = module_name(relative)
        if modules is not None and name.split(".")[0] not in modules:
            continue
        yield name, path


def _functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) of functions at module level and in classes, in source order."""

    def walk(body: Iterable[ast.stmt], prefix: str) -> Iterator[tuple[str, Any]]:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield prefix + node.name, node
            elif isinstance(node, ast.ClassDef):
                yield from walk(node.body, prefix + node.name + ".")

    yield from walk(tree.body, "")


def _document(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The function's code without its docstring lines, dedented and capped; None if rule 4 fails."""
    doc_node = node.body[0]
    if doc_node.lineno == node.lineno or len(node.body) < 2:
        return None  # the docstring is on the def line, or it is the whole body
    header = lines[node.lineno - 1 : doc_node.lineno - 1]
    rest = lines[doc_node.end_lineno : node.end_lineno]
    body = [line for line in rest if line.strip()]
    if len(body) < MIN_DOC_BODY_LINES:
        return None
    if len(body) == 1 and _TRIVIAL_BODY.match(body[0].strip()):
        return None
    text = textwrap.dedent("\n".join(header + rest)).strip("\n")
    kept = [line.rstrip() for line in text.split("\n") if line.strip()][:MAX_DOC_LINES]
    text = "\n".join(kept)
    if len(text) > MAX_DOC_CHARS:
        cut = text[:MAX_DOC_CHARS]
        text = cut.rsplit("\n", 1)[0] if "\n" in cut else cut
    return text


def extract(module: str, source: str) -> list[dict[str, Any]]:
    """The candidate pairs of one module's source (rules 2-4), before dedupe and splits."""
    source = source.replace("\r\n", "\n").replace("\r", "\n")
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.split("\n")
    seen: set[str] = set()
    pairs = []
    for qualname, node in _functions(tree):
        if qualname in seen:
            continue
        seen.add(qualname)
        docstring = ast.get_docstring(node, clean=True)
        if not docstring:
            continue
        query = first_sentence(docstring)
        if len(query.split()) < MIN_QUERY_WORDS or len(query) > MAX_QUERY_CHARS or ">>>" in query:
            continue
        document = _document(lines, node)
        if document is None:
            continue
        pairs.append(
            {
                "module": module,
                "qualname": qualname,
                "lineno": node.lineno,
                "query": query,
                "document": document,
            }
        )
    return pairs


def _read(path: Path) -> str | None:
    try:
        with tokenize.open(path) as f:
            return f.read()
    except (SyntaxError, UnicodeDecodeError, OSError):
        return None


def build(root: Path | None = None, modules: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """All pairs of the library at ``root`` (default: this interpreter's), rules 1-6, in file order.

    Each pair: ``{"module", "qualname", "lineno", "query", "document", "split"}``.
    """
    root = default_stdlib() if root is None else Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"standard library folder {root} does not exist")
    pairs: list[dict[str, Any]] = []
    for module, path in source_files(root, modules):
        source = _read(path)
        if source is not None:
            pairs.extend(extract(module, source))
    queries = Counter(p["query"] for p in pairs)
    documents = Counter(p["document"] for p in pairs)
    kept = [p for p in pairs if queries[p["query"]] == 1 and documents[p["document"]] == 1]
    for p in kept:
        p["split"] = split_of(p["module"], p["qualname"])
    return kept


def header(pairs: Sequence[dict[str, Any]], modules: Sequence[str] | None = None) -> dict[str, Any]:
    """The data file's first line: format, Python version, rules and counts per split."""
    counts = Counter(p["split"] for p in pairs)
    return {
        "format": FORMAT,
        "python": ".".join(str(v) for v in sys.version_info[:3]),
        "source": "CPython standard library (PSF License Agreement; see LICENSE-PSF.txt and NOTICE)",
        "modules": None if modules is None else sorted(modules),
        "rules": rules(),
        "counts": {name: counts.get(name, 0) for name, _ in SPLIT_EDGES},
    }


def encode(pairs: Sequence[dict[str, Any]], modules: Sequence[str] | None = None) -> bytes:
    """The gzip bytes of the data file: reproducible (mtime 0, no name, level 9, sorted keys)."""
    text = io.StringIO()
    for record in [header(pairs, modules), *pairs]:
        text.write(json.dumps(record, sort_keys=True, ensure_ascii=True) + "\n")
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=9, mtime=0) as gz:
        gz.write(text.getvalue().encode("ascii"))
    return out.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build the pairs and write them (default: ``code_pairs.jsonl.gz`` beside this file)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--stdlib", type=Path, default=None, help="library root (default: this Python's)")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("code_pairs.jsonl.gz"))
    parser.add_argument("--module", action="append", default=None, help="only these top-level modules")
    args = parser.parse_args(argv)
    pairs = build(args.stdlib, args.module)
    data = encode(pairs, args.module)
    args.output.write_bytes(data)
    counts = header(pairs, args.module)["counts"]
    print(f"{args.output}: {len(pairs)} pairs {counts}, {len(data)} bytes, python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
