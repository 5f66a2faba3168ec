"""Sources of text and their mixtures: `self` (sampled from the model), `file:PATH`, `dataset:NAME`, each with an
optional weight (`SPEC@WEIGHT`), as `--calib-source` and `heal --data` take them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from transmla.errors import TransMLAError

KINDS = ("self", "file", "dataset")
SELF = "self"


@dataclass(frozen=True)
class TextSource:
    """One source of a mixture: what it is and its share (weights are relative)."""

    kind: str  # self | file | dataset
    value: str | None = None  # the file's path or the dataset's name
    weight: float = 1.0

    @property
    def label(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value}"

    def spec(self) -> str:
        return self.label if self.weight == 1.0 else f"{self.label}@{self.weight:g}"


def parse_source(spec: str, flag: str = "--calib-source") -> TextSource:
    """`self`, `file:PATH` or `dataset:NAME`, optionally `@WEIGHT`; a bare existing path is a file."""
    text, weight = spec, 1.0
    if "@" in spec:
        head, _, tail = spec.rpartition("@")
        try:
            weight = float(tail)
        except ValueError:
            head = spec  # an '@' inside a path, not a weight
        else:
            text = head
    if not weight > 0 or not math.isfinite(weight):
        raise TransMLAError(f"{flag} {spec!r}: the weight after '@' must be a positive number")
    if text == SELF:
        return TextSource(SELF, None, weight)
    kind, sep, value = text.partition(":")
    if sep and kind in ("file", "dataset") and value:
        source = TextSource(kind, value, weight)
    elif Path(text).expanduser().is_file():
        source = TextSource("file", text, weight)
    else:
        raise TransMLAError(f"{flag} {spec!r} is not one of self, file:PATH, dataset:NAME (each optionally @WEIGHT)")
    if source.kind == "file" and not Path(source.value).expanduser().is_file():
        raise TransMLAError(f"text file not found: {source.value}; pass the path of an existing UTF-8 text file")
    return source


def loose_spec(item: str) -> str:
    """A source as `convert --heal-data` takes it (a spec, `self-distill`, a text file's path or a dataset's name)
    as a spec."""
    if item == "self-distill":
        return SELF
    if item == SELF or item.startswith((f"{SELF}@", "file:", "dataset:")):
        return item
    return f"file:{item}" if Path(item).expanduser().is_file() else f"dataset:{item}"


def source_specs(specs: list[str], files: list, datasets: list[str], self_too: bool = False) -> tuple[str, ...]:
    """A command's `--*-source`/`--data` specs, its file and dataset flags (and `self`) as one list of specs."""
    return (*specs, *(f"file:{path}" for path in files), *(f"dataset:{name}" for name in datasets),
            *([SELF] if self_too else []))


def parse_sources(specs: list[str] | tuple[str, ...], flag: str = "--calib-source") -> list[TextSource]:
    """The mixture the specs name (`self` alone when there are none); a source named twice is refused."""
    sources = [parse_source(s, flag) for s in specs] or [TextSource(SELF)]
    labels = [s.label for s in sources]
    if len(set(labels)) != len(labels):
        raise TransMLAError(f"{flag}: {sorted(l for l in labels if labels.count(l) > 1)[0]} is given twice; give each source once, with a weight")
    return sources


def shares(sources: list[TextSource], total: int) -> list[int]:
    """How many of `total` items each source contributes: proportional to the weights, largest remainders
    first, every source at least one while there are enough."""
    weights = [s.weight for s in sources]
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(sources)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    for i in range(len(counts)):  # no source silently dropped
        if counts[i] == 0 and total >= len(counts):
            donor = max(range(len(counts)), key=lambda j: counts[j])
            counts[donor] -= 1
            counts[i] += 1
    return counts


def describe(sources: list[TextSource]) -> str:
    """A short human description of a mixture, for records and progress lines."""
    if len(sources) == 1:
        return sources[0].label
    total = sum(s.weight for s in sources)
    return " + ".join(f"{s.weight / total:.0%} {s.label}" for s in sources)
