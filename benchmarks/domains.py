"""Evaluation domains for the generalisation benchmark: each a held-out test text and a separate dev text (for
choosing settings) that share no document, none of them used for calibration or healing.

| domain | kind | test / dev | source | license |
| --- | --- | --- | --- | --- |
| wikitext | English encyclopedic prose | WikiText-2 raw test / the last articles of WikiText-2 validation (tokenized release) | `../shared/data` | CC BY-SA 3.0, GFDL |
| pydocs | documentation (English) | the Python Language Reference topics, alternate topics | `pydoc_data.topics` (CPython 3.11) | PSF |
| code | Python source | alternate standard-library modules | the CPython 3.11 standard library | PSF |
| c | C source | alternate source files of Lua 5.4.8 | PyPI sdist `lupa` 2.8, `third-party/lua54` | MIT |
| javascript | JavaScript source | alternate modules of ESLint 9.39.1 (`lib/`) | npm package `eslint` 9.39.1 | MIT |
| german | German technical prose | alternate blocks of paragraphs | Debian Reference, German (Debian `debian-reference-de` 2.100) | GPL-2+ |
| spanish | Spanish literary prose | alternate short books of the Reina-Valera 1909 Bible | Debian `sword-text-sparv` 2.60-1 | public domain |
| chat | English dialogue (chatbot turns) | alternate groups of conversations that open alike, duplicates dropped | PyPI `chatterbot-corpus` 1.3.3, `data/english` | BSD-3-Clause |

WikiText-2 validation is also the calibration text of the benchmark, so it is split at an article boundary: its
last articles (from the last article start that leaves at least `WIKI_DEV_CHARS` characters, about 64k) are the
WikiText dev text, the rest (about 1.04 M characters) the calibration text (`wikitext_calibration_file()`). Both
parts are written on first use under `CACHE` (git-ignored `build/domains/`, or `$TRANSMLA_CACHE`) from the
validation file in `SHARED` (`../shared/data`, or `$TRANSMLA_DATA` on a machine without `../shared`).

Every other domain is built once by this script into `benchmarks/data/` (committed, so that every machine
evaluates the same text):

    cd /tmp
    apt-get download debian-reference-de sword-text-sparv
    dpkg -x debian-reference-de_*.deb /tmp/debref && dpkg -x sword-text-sparv_*.deb /tmp/sparv
    pip download --no-deps --no-binary :all: lupa==2.8 && tar xzf lupa-2.8.tar.gz
    npm pack eslint@9.39.1 && mkdir -p eslint && tar xzf eslint-9.39.1.tgz -C eslint
    pip download --no-deps chatterbot-corpus==1.3.3 && python -m zipfile -e chatterbot_corpus-1.3.3-*.whl chatterbot
    cd -
    python benchmarks/domains.py \\
        --debian-reference /tmp/debref/usr/share/debian-reference/debian-reference.de.txt.gz \\
        --bible /tmp/sparv/usr/share/sword/modules/texts/ztext/spaRV1909eb \\
        --lua /tmp/lupa-2.8/third-party/lua54 --eslint /tmp/eslint/package \\
        --chatterbot /tmp/chatterbot/chatterbot_corpus/data/english

`--domains c spanish` rebuilds only those (each needs only its own source flag); `--check` prints characters and
2048-token windows (SmolLM2 tokenizer) of every domain's test and dev text.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import struct
import sysconfig
import zlib
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
SHARED = Path(os.environ.get("TRANSMLA_DATA") or ROOT.parent / "shared" / "data")  # the WikiText-2 files
CACHE = Path(os.environ.get("TRANSMLA_CACHE") or ROOT / "build" / "domains")  # the two parts of WikiText-2 validation
DOMAINS = ("wikitext", "pydocs", "code", "c", "javascript", "german", "spanish", "chat")
LABELS = {"wikitext": "WikiText-2", "pydocs": "Python docs", "code": "Python code", "c": "C code",
          "javascript": "JavaScript", "german": "German docs", "spanish": "Spanish prose", "chat": "chat"}
CHARS = 64_000  # per built file: more than 4 windows of 2048 tokens in every domain
WIKI_VALID = "wikitext2-valid-tokenized.txt"
WIKI_DEV_CHARS = 64_000  # at least this much of the validation file's tail is the WikiText dev text
ARTICLE = re.compile(r"^ = [^=\n].* = $", re.MULTILINE)  # a WikiText article title (sections have `= =`)


def path(domain: str, split: str) -> Path:
    """The text file of one domain's split (`test` or `dev`)."""
    if domain not in DOMAINS or split not in ("test", "dev"):
        raise ValueError(f"unknown domain or split: {domain}/{split}")
    if domain == "wikitext":
        return SHARED / "wikitext2-raw-test.txt" if split == "test" else _wikitext_part("dev", strict=True)
    return DATA / f"{domain}-{split}.txt"


def wikitext_calibration_file() -> Path:
    """WikiText-2 validation less the WikiText dev articles: the benchmark's calibration (and healing) text.

    Written under `CACHE` when the validation file is there; otherwise the path is returned as it would be
    (so that importing the benchmark, or its `--help`, needs no data), and reading it fails.
    """
    return _wikitext_part("calibration", strict=False)


def wikitext_split(text: str, tail: int = WIKI_DEV_CHARS) -> dict[str, str]:
    """Split WikiText validation text before the last article title that leaves at least `tail` characters."""
    starts = [m.start() for m in ARTICLE.finditer(text) if len(text) - m.start() >= tail]
    if len(starts) < 2:
        raise ValueError(f"the WikiText validation text has no article boundary {tail:,} characters from its end")
    return {"calibration": text[:starts[-1]], "dev": text[starts[-1]:]}


def _wikitext_part(part: str, strict: bool) -> Path:
    target = CACHE / f"wikitext2-valid-{part}.txt"
    source = SHARED / WIKI_VALID
    if not source.is_file():
        if strict:
            raise FileNotFoundError(f"{source} is missing: the WikiText dev and calibration texts are cut from it "
                                    "(set TRANSMLA_DATA to the folder that holds it)")
        return target
    parts = wikitext_split(source.read_text(encoding="utf-8"))
    CACHE.mkdir(parents=True, exist_ok=True)
    for name, text in parts.items():
        out = CACHE / f"wikitext2-valid-{name}.txt"
        if not out.is_file() or out.read_text(encoding="utf-8") != text:
            tmp = out.with_name(f".{out.name}.{os.getpid()}")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, out)  # atomic: a concurrent reader sees the old or the new file, never half of one
    return target


def alternate(pieces: list[str], limit: int = CHARS) -> dict[str, str]:
    """Even pieces to test, odd to dev, each joined by blank lines and cut after `limit` characters."""
    out = {}
    for split, start in (("test", 0), ("dev", 1)):
        text, size = [], 0
        for piece in pieces[start::2]:
            text.append(piece)
            size += len(piece) + 2
            if size >= limit:
                break
        out[split] = "\n\n".join(text)
    return out


def pydocs() -> dict[str, str]:
    import pydoc_data.topics as topics

    return alternate([topics.topics[k].strip() for k in sorted(topics.topics)])


def code() -> dict[str, str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if not p.name.startswith("_") and p.stat().st_size > 4000)
    return alternate([p.read_text(encoding="utf-8") for p in files])


def source_files(root: Path, pattern: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """Files under `root` matching `pattern`, by path, of 4,000 to 24,000 characters (whole files, none huge)."""
    texts = []
    for p in sorted(root.glob(pattern), key=lambda p: p.relative_to(root).as_posix()):
        if p.name in exclude:
            continue
        text = p.read_text(encoding="utf-8")
        if 4000 <= len(text) <= 24000:
            texts.append(text.rstrip() + "\n")
    if not texts:
        raise ValueError(f"no source files {pattern} of 4,000 to 24,000 characters under {root}")
    return texts


def c(lua: Path) -> dict[str, str]:
    """Lua 5.4 C sources and headers (the test-suite hooks `ltests.*` left out), alternate files."""
    return alternate(source_files(lua, "*.[ch]", exclude=("ltests.c", "ltests.h")))


def javascript(eslint: Path) -> dict[str, str]:
    """ESLint's `lib/**/*.js` (the linter, its CLI and its rules), alternate modules."""
    return alternate(source_files(eslint / "lib", "**/*.js"))


def german(source: Path) -> dict[str, str]:
    """Paragraphs of the German Debian Reference (tables and rules dropped), in blocks of 12 paragraphs."""
    text = gzip.open(source, "rt", encoding="utf-8").read()
    paragraphs = []
    for block in text.split("\n\n"):
        lines = [line.strip() for line in block.splitlines()]
        if not lines or any(line.startswith(("|", "+", "-")) for line in lines):
            continue
        paragraph = " ".join(line for line in lines if line)
        if len(paragraph) > 80:  # prose, not headings or single commands
            paragraphs.append(paragraph)
    blocks = ["\n\n".join(paragraphs[i:i + 12]) for i in range(0, len(paragraphs), 12)]
    return alternate(blocks[len(blocks) // 10:])  # past the front matter


def bible_books(module: Path) -> list[tuple[str, list[str]]]:
    """(title, chapters) of every book of a SWORD zText module (one zlib block per book, OSIS markup).

    `.bzs` holds one (offset, compressed size, size) record of three little-endian uint32 per block of `.bzz`;
    a block is a book's OSIS text, from which the chapter milestones are kept and every other tag dropped.
    """
    books = []
    for testament in ("ot", "nt"):
        index, blob = (module / f"{testament}.bzs").read_bytes(), (module / f"{testament}.bzz").read_bytes()
        for i in range(0, len(index), 12):
            offset, size, _ = struct.unpack("<III", index[i:i + 12])
            osis = zlib.decompress(blob[offset:offset + size]).decode("utf-8")
            title = re.search(r'<title[^>]*type="main"[^>]*>(.*?)</title>', osis)
            if title is None:  # the module's header block
                continue
            chapters = [re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", c)).strip()
                        for c in re.split(r'<chapter [^>]*sID="[^"]*"/>', osis)[1:]]
            books.append((title.group(1), [c for c in chapters if c]))
    return books


def spanish(module: Path) -> dict[str, str]:
    """Short books (under 40k characters) of the Reina-Valera 1909 Bible in canonical order, alternate books:
    a title line, then one paragraph per chapter."""
    books = [(t, ch) for t, ch in bible_books(module) if sum(map(len, ch)) < 40_000]
    return alternate(["\n\n".join([title, *chapters]) for title, chapters in books])


def chat(corpus: Path) -> dict[str, str]:
    """The English conversations of the ChatterBot corpus (files by name), each conversation once, as turns of two
    speakers `A:` and `B:`. Conversations that open alike (the corpus has several answers to many questions) are
    one piece, so that test and dev share no opening; alternate pieces."""
    import yaml

    seen, groups = set(), {}
    for f in sorted(corpus.glob("*.yml")):
        for conversation in yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations") or []:
            turns = tuple(str(t).strip() for t in conversation if str(t).strip())
            if len(turns) < 2 or turns in seen:
                continue
            seen.add(turns)
            opening = " ".join(re.findall(r"\w+", turns[0].casefold()))
            groups.setdefault(opening, []).append("\n".join(f"{'AB'[i % 2]}: {t}" for i, t in enumerate(turns)))
    return alternate(["\n\n".join(group) for group in groups.values()])


def check() -> None:
    """Characters, tokens and 2048-token windows of every domain's test and dev text (SmolLM2 tokenizer)."""
    import sys

    sys.path.insert(0, str(ROOT))
    from transmla.data.text import tokenize
    from transmla.io.source import open_source

    tokenizer = open_source("smollm2-135m").require_tokenizer("the check")
    for domain in DOMAINS:
        for split in ("test", "dev"):
            text = path(domain, split).read_text(encoding="utf-8")
            tokens = tokenize(tokenizer, text).numel()
            print(f"{domain}/{split}: {len(text):,} characters, {tokens:,} tokens, {tokens // 2048} windows of 2048")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--debian-reference", type=Path, help="debian-reference.de.txt.gz (german)")
    parser.add_argument("--bible", type=Path, help="the SWORD module folder .../ztext/spaRV1909eb (spanish)")
    parser.add_argument("--lua", type=Path, help="lupa-2.8/third-party/lua54 (c)")
    parser.add_argument("--eslint", type=Path, help="the unpacked npm package eslint-9.39.1 (javascript)")
    parser.add_argument("--chatterbot", type=Path, help="chatterbot_corpus/data/english (chat)")
    parser.add_argument("--domains", nargs="+", choices=DOMAINS[1:], default=list(DOMAINS[1:]),
                        help="the domains to build [default: all but wikitext]")
    parser.add_argument("--check", action="store_true", help="only print the size of every domain's texts")
    args = parser.parse_args()
    if args.check:
        return check()
    builders: dict[str, tuple[str | None, Callable[..., dict[str, str]]]] = {
        "pydocs": (None, pydocs), "code": (None, code), "c": ("lua", c), "javascript": ("eslint", javascript),
        "german": ("debian_reference", german), "spanish": ("bible", spanish), "chat": ("chatterbot", chat)}
    missing = [f"--{builders[d][0].replace('_', '-')}" for d in args.domains
               if builders[d][0] and getattr(args, builders[d][0]) is None]
    if missing:
        parser.error(f"building {' '.join(args.domains)} needs {' '.join(missing)} (or choose --domains)")
    DATA.mkdir(exist_ok=True)
    for domain in args.domains:
        flag, build = builders[domain]
        for split, text in (build(getattr(args, flag)) if flag else build()).items():
            path(domain, split).write_text(text + "\n", encoding="utf-8")
            print(f"{path(domain, split).relative_to(ROOT)}: {len(text):,} characters")


if __name__ == "__main__":
    main()
