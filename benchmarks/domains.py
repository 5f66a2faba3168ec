"""Evaluation domains for the generalisation benchmark: each a held-out test text and a separate dev text (for
choosing settings), none of them used for calibration or healing.

| domain | test / dev | source |
| --- | --- | --- |
| wikitext | WikiText-2 raw test / WikiText-2 validation (tokenized release) | `../shared/data` |
| pydocs | the Python Language Reference topics, alternate topics | `pydoc_data.topics` (CPython 3.11) |
| code | Python source, alternate standard-library modules | the CPython 3.11 standard library |
| german | German technical prose, alternate blocks of paragraphs | Debian Reference, German translation |

The last three are built once by this script into `benchmarks/data/` (committed, so that every machine
evaluates the same text):

    apt-get download debian-reference-de && dpkg -x debian-reference-de_*.deb /tmp/debref
    python benchmarks/domains.py --debian-reference /tmp/debref/usr/share/debian-reference/debian-reference.de.txt.gz
"""

from __future__ import annotations

import argparse
import gzip
import os
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
SHARED = Path(os.environ.get("TRANSMLA_DATA") or ROOT.parent / "shared" / "data")  # the WikiText-2 files
DOMAINS = ("wikitext", "pydocs", "code", "german")
LABELS = {"wikitext": "WikiText-2", "pydocs": "Python docs", "code": "Python code", "german": "German docs"}
CHARS = 64_000  # per built file: more than 4 windows of 2048 tokens in every domain


def path(domain: str, split: str) -> Path:
    """The text file of one domain's split (`test` or `dev`)."""
    if domain == "wikitext":
        return SHARED / ("wikitext2-raw-test.txt" if split == "test" else "wikitext2-valid-tokenized.txt")
    return DATA / f"{domain}-{split}.txt"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--debian-reference", type=Path, required=True, help="debian-reference.de.txt.gz")
    args = parser.parse_args()
    DATA.mkdir(exist_ok=True)
    for domain, texts in (("pydocs", pydocs()), ("code", code()), ("german", german(args.debian_reference))):
        for split, text in texts.items():
            path(domain, split).write_text(text + "\n", encoding="utf-8")
            print(f"{path(domain, split).relative_to(ROOT)}: {len(text):,} characters")


if __name__ == "__main__":
    main()
