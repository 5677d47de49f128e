"""Real text, offline: Jane Austen's six novels and the King James Bible from Debian packages, or a local file.

``prepare(name)`` downloads the packages with ``apt-get download``, unpacks them with ``dpkg-deb -x`` into
``<cache>/debian/<name>/`` and writes plain UTF-8 text to ``<cache>/corpora/<name>.txt`` plus a small
``<name>.json`` record. It is idempotent: a prepared corpus is not fetched again (``force=True`` redoes it).

* ``austen`` (``r-cran-janeaustenr``): the novels are an R lazy-load data base (``Rdata.rdx`` index +
  ``Rdata.rdb`` zlib-compressed serialised objects); each object is parsed with PyPI ``rdata``. Hard-wrapped
  lines are joined into paragraphs; paragraphs are separated by a blank line.
* ``kjv`` (``bible-kjv`` + ``bible-kjv-text``): the text ships in the ``bible`` program's own compressed
  format, so the unpacked program prints it; verse references are dropped, one paragraph per chapter.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import lzma
import os
import re
import struct
import subprocess
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from spattn.data import debian
from spattn.data.cache import cache_dir as _cache_dir

_FORMAT_VERSION = 1

# publication order, as janeaustenr::austen_books()
AUSTEN_BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    packages: tuple[str, ...]
    description: str
    extract: Callable[[Path], str]


def _paragraphs(lines: list[str]) -> str:
    """Join hard-wrapped lines into paragraphs (blank line = paragraph break)."""
    paragraphs, current = [], []
    for line in lines:
        line = line.strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs) + "\n"


def _read_lazyload_db(base: Path) -> dict[str, object]:
    """Read every object of an R lazy-load data base ``base.rdx`` / ``base.rdb`` with ``rdata``."""
    from spattn._optional import require

    rdata = require("rdata", extra="hf")
    index = rdata.read_rds(str(base.with_suffix(".rdx")))
    blob = base.with_suffix(".rdb").read_bytes()
    compressed = index.get("compressed", True)
    try:
        kind = int(compressed[0]) if hasattr(compressed, "__len__") else int(compressed)
    except (TypeError, ValueError):
        kind = 1
    out = {}
    for name, (offset, length) in index["variables"].items():
        record = blob[int(offset) : int(offset) + int(length)]
        size = struct.unpack(">I", record[:4])[0]
        if kind in (2, 3):  # one type byte follows the length: 'Z' zlib, '2' bzip2, 'X' xz, '0' none
            tag, body = record[4:5], record[5:]
            data = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress}.get(tag, bytes)(body)
        else:
            data = zlib.decompress(record[4:])
        if len(data) != size:
            raise ValueError(f"{base.name}: object {name!r} decompressed to {len(data)} bytes, expected {size}")
        out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(data))
    return out


def _extract_austen(root: Path) -> str:
    import warnings

    found = sorted(root.glob("usr/lib/R/site-library/janeaustenr/data/Rdata.rdx"))
    if not found:
        raise FileNotFoundError(f"no janeaustenr data base (Rdata.rdx) under {root}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata: "Unknown file type: assumed RDS" for the bare objects
        books = _read_lazyload_db(found[0].with_suffix(""))
    missing = [b for b in AUSTEN_BOOKS if b not in books]
    if missing:
        raise ValueError(f"janeaustenr data base lacks {missing}; it has {sorted(books)}")
    return "\n".join(_paragraphs([str(x) for x in books[b]]) for b in AUSTEN_BOOKS)


_VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")


def _run_bible(root: Path) -> str:
    program = root / "usr/bin/bible"
    data = root / "usr/lib"
    if not program.is_file() or not (data / "bible.data").is_file():
        raise FileNotFoundError(f"no bible program / bible.data under {root}")
    cmd = [str(program), "-f", "-p", str(data), "Gen1:1-Rev22:21"]
    env = dict(os.environ)
    result = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env, check=False)
    if result.returncode != 0 and "error while loading shared libraries" in result.stderr:
        # the program links readline; fetch it next to the corpus instead of installing it
        libs = root / "libs"
        debian.fetch(["libreadline8"], libs)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(str(p) for p in sorted(libs.glob("**/lib*/**")) if p.is_dir())
        result = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the bible program failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _extract_kjv(root: Path) -> str:
    chapters: list[list[str]] = []
    last = None
    for line in _run_bible(root).splitlines():
        m = _VERSE.match(line.strip())
        if not m:
            continue
        chapter = (m.group(1), m.group(2))
        if chapter != last:
            chapters.append([])
            last = chapter
        chapters[-1].append(m.group(4).strip())
    if len(chapters) < 1000:
        raise ValueError(f"the bible program printed only {len(chapters)} chapters; expected 1189")
    return "\n\n".join(" ".join(verses) for verses in chapters) + "\n"


CORPORA: dict[str, CorpusSpec] = {
    "austen": CorpusSpec(
        "austen", ("r-cran-janeaustenr",), "Jane Austen's six novels (Debian r-cran-janeaustenr)", _extract_austen
    ),
    "kjv": CorpusSpec(
        "kjv", ("bible-kjv", "bible-kjv-text"), "King James Bible (Debian bible-kjv + bible-kjv-text)", _extract_kjv
    ),
}


def _spec(name: str) -> CorpusSpec:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; known corpora: {sorted(CORPORA)} (or pass a text file path)")
    return CORPORA[name]


def corpus_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the prepared text of corpus ``name`` lives (it may not exist yet)."""
    _spec(name)
    return _cache_dir(cache_dir) / "corpora" / f"{name}.txt"


def corpus_info(name: str, cache_dir: str | os.PathLike | None = None) -> dict | None:
    """The record written by :func:`prepare` (``None`` when the corpus is not prepared)."""
    meta = corpus_path(name, cache_dir).with_suffix(".json")
    if not meta.is_file():
        return None
    try:
        info = json.loads(meta.read_text())
    except ValueError:
        return None
    text = meta.with_suffix(".txt")
    if info.get("format") != _FORMAT_VERSION or not text.is_file() or text.stat().st_size != info.get("bytes"):
        return None
    return info


def prepare(name: str, *, cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Fetch and convert corpus ``name`` (``"austen"`` or ``"kjv"``) once; returns the text file's path."""
    spec = _spec(name)
    path = corpus_path(name, cache_dir)
    if not force and corpus_info(name, cache_dir) is not None:
        return path
    root = _cache_dir(cache_dir) / "debian" / name
    debs = debian.fetch(list(spec.packages), root)
    text = spec.extract(root)
    if not text.strip():
        raise ValueError(f"corpus {name!r} came out empty")
    data = text.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".txt.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    info = {
        "format": _FORMAT_VERSION,
        "name": name,
        "description": spec.description,
        "packages": debs,
        "bytes": len(data),
        "characters": len(text),
        "words": len(text.split()),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return path


MAX_TEXT_CHARS = 1 << 26  # load_text reads at most this many characters of a file by default (64 Mi)
_SNIFF_BYTES = 1 << 13


def load_text(source: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
              max_chars: int | None = MAX_TEXT_CHARS) -> str:
    """The text of a corpus name (``"austen"``, ``"kjv"``: prepared on first use), a local text file, or
    ``"hf:<dataset>[:<split>[:<column>]]"`` (needs the ``datasets`` package and internet access).

    A file must be UTF-8 text: one with NUL bytes or invalid UTF-8 in its first 8 KiB is refused as binary.
    At most ``max_chars`` characters are read (default 64 Mi, far more than any evaluation here tokenises;
    ``None`` reads everything); a longer file is cut there with a ``UserWarning`` that says so.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for empty or binary text.
    """
    if isinstance(source, str) and source in CORPORA:
        text = prepare(source, cache_dir=cache_dir).read_text(encoding="utf-8")
        where = f"corpus {source!r}"
    elif isinstance(source, str) and source.startswith("hf:"):
        text, where = _load_hf_dataset(source), source
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"text file not found: {path} (known corpora: {sorted(CORPORA)}, or 'hf:<dataset name>')"
            )
        if not path.is_file():
            raise ValueError(f"text source {path} is not a file")
        text = _read_text_file(path, max_chars)
        where = f"file {path}"
    if not text.strip():
        raise ValueError(f"{where} is empty: there is no text to evaluate on")
    return text


def _read_text_file(path: Path, max_chars: int | None) -> str:
    """The UTF-8 text of ``path``: refuses a binary file, reads at most ``max_chars`` characters and says so."""
    import codecs
    import warnings

    if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1):
        raise ValueError(f"max_chars must be an int >= 1 or None, got {max_chars!r}")
    with open(path, "rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    if b"\x00" in head:
        raise ValueError(f"text file {path} looks binary (a NUL byte at offset {head.index(0)}): "
                         "pass a UTF-8 text file")
    try:
        codecs.getincrementaldecoder("utf-8")("strict").decode(head, final=False)
    except UnicodeDecodeError as exc:
        raise ValueError(f"text file {path} is not UTF-8 text (invalid byte at offset {exc.start}): pass a UTF-8 "
                         "text file") from None
    with open(path, encoding="utf-8", errors="replace") as handle:
        text = handle.read(-1 if max_chars is None else max_chars + 1)
    if max_chars is not None and len(text) > max_chars:
        text = text[:max_chars]
        warnings.warn(f"text file {path} is {path.stat().st_size:,} bytes: read only its first {max_chars:,} "
                      "characters (load_text(..., max_chars=None) reads it all)", UserWarning, stacklevel=3)
    return text


def _load_hf_dataset(source: str) -> str:
    from spattn._optional import MissingExtraError

    try:
        import datasets
    except ImportError:
        raise MissingExtraError(f"text source {source!r} needs the Hugging Face datasets package, which is not "
                                "installed: pip install datasets (and internet access)") from None
    parts = source[3:].split(":")
    name, split, column = parts[0], (parts[1] if len(parts) > 1 else "test"), (parts[2] if len(parts) > 2 else "text")
    if not name:
        raise ValueError(f"no dataset name in {source!r}; use hf:<dataset>[:<split>[:<column>]]")
    dataset = datasets.load_dataset(name, split=split)
    if column not in dataset.column_names:
        raise ValueError(f"dataset {name!r} has no column {column!r}; columns: {dataset.column_names}")
    return "\n\n".join(str(x) for x in dataset[column])
