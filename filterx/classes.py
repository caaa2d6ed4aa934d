"""Class metadata and class-name specs: which source classes a user means by "coffee mug".

The ImageNet-1k class list ships as package data (``data/imagenet1k_synsets.txt``, line i =
class index i: wnid, then comma-separated synset names). A pool's classes are
``ClassInfo(index, name, wnid)`` records (``class_info_for_folders`` builds them for an
ImageFolder); ``resolve_classes`` turns a user's spec into the classes it names:

    spec = "coffee mug, n03793489"      # names or wnids, comma-separated
    spec = "@my_classes.txt"            # one name or wnid per line, '#' starts a comment
    spec = "@office31"                  # the preset: 42 ImageNet classes related to Office-31

    resolve_classes(spec, classes)                     # -> [ClassInfo, ...] sorted by index
    print(describe_matches(match_classes(spec, classes)))   # what each entry matched

Names compare case-insensitively with runs of spaces and underscores read as one space
("coffee_mug" == "Coffee Mug"); hyphens are kept ("pay-phone").
"""

from __future__ import annotations

import difflib
import functools
import importlib.resources
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from filterx.scorers import ClassInfo

# Named presets for "@NAME" specs: package data files listing {"entry", "wnid", "name"}.
PRESETS = {"office31": "office31_imagenet.json"}

MATCH_MODES = ("exact", "substring")

_WNID = re.compile(r"^n\d{8}$")


@dataclass(frozen=True)
class ImageNetClass:
    """One ImageNet-1k class: label index, WordNet id, synset names (the first: display name)."""

    index: int
    wnid: str
    names: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.names[0]


@dataclass(frozen=True)
class ClassMatch:
    """What one entry of a spec matched: ``classes`` sorted by index, never empty."""

    entry: str
    classes: tuple[ClassInfo, ...]


def _read_data(filename: str) -> str:
    return (importlib.resources.files("filterx") / "data" / filename).read_text(encoding="utf-8")


@functools.cache
def imagenet_classes() -> tuple[ImageNetClass, ...]:
    """The 1000 ImageNet-1k classes in label order (index i = line i of the shipped list)."""
    out = []
    for index, line in enumerate(_read_data("imagenet1k_synsets.txt").splitlines()):
        wnid, _, names = line.partition(" ")
        out.append(ImageNetClass(index, wnid, tuple(n.strip() for n in names.split(","))))
    return tuple(out)


@functools.cache
def _imagenet_by_wnid() -> dict[str, ImageNetClass]:
    return {c.wnid: c for c in imagenet_classes()}


def class_info_for_folders(folder_names: list[str]) -> tuple[ClassInfo, ...]:
    """Class records for an ImageFolder's class folders, given in label order (sorted).

    ``ClassInfo(index=i, name=..., wnid=...)``: a folder named by an ImageNet wnid gets that
    class's display name and the wnid; any other folder keeps its own name and wnid None.
    """
    dupes = sorted(f for f, n in Counter(folder_names).items() if n > 1)
    if dupes:
        raise ValueError(f"class folder names must be unique; repeated: {dupes}")
    by_wnid = _imagenet_by_wnid()
    return tuple(
        ClassInfo(i, by_wnid[f].name, f) if f in by_wnid else ClassInfo(i, f, None)
        for i, f in enumerate(folder_names)
    )


def preset_entries(name: str) -> list[dict[str, str]]:
    """The rows {"entry", "wnid", "name"} of preset ``name`` (see ``PRESETS``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown class preset @{name}; valid presets: {sorted(PRESETS)}")
    return json.loads(_read_data(PRESETS[name]))


def parse_class_spec(spec: str | list[str]) -> list[str]:
    """The entries (names or wnids) of a spec, in order, blanks dropped.

    A string is comma-separated entries, or "@PRESET" (a name in ``PRESETS``; presets win over
    a file of the same name, write "@./office31" for the file), or "@PATH": a text file with
    one entry per line, '#' starting a comment. A list is several such strings.
    """
    parts = [spec] if isinstance(spec, str) else list(spec)
    entries: list[str] = []
    for part in parts:
        part = part.strip()
        if part.startswith("@"):
            ref = part[1:].strip()
            if ref in PRESETS:
                entries += [row["wnid"] for row in preset_entries(ref)]
                continue
            path = Path(ref).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"class list file {str(path)!r} not found (from spec {part!r}); "
                    f"presets: {', '.join('@' + p for p in sorted(PRESETS))}"
                )
            lines = path.read_text(encoding="utf-8").splitlines()
            entries += [ln.split("#", 1)[0].strip() for ln in lines]
        else:
            entries += part.split(",")
    return [e.strip() for e in entries if e.strip()]


def _norm(name: str) -> str:
    return re.sub(r"[\s_]+", " ", name).strip().casefold()


def _names_of(c: ClassInfo) -> list[str]:
    """Every name a pool class answers to: its display name and, for ImageNet, all synset names."""
    names = [c.name]
    if c.wnid is not None and c.wnid in _imagenet_by_wnid():
        names += [n for n in _imagenet_by_wnid()[c.wnid].names if n != c.name]
    return names


def _label(c: ClassInfo) -> str:
    return f"{c.wnid} ({c.name})" if c.wnid else repr(c.name)


def match_classes(
    spec: str | list[str], classes: tuple[ClassInfo, ...], *, match: str = "exact"
) -> list[ClassMatch]:
    """What each entry of ``spec`` (see ``parse_class_spec``) names among ``classes``.

    exact:     the entry equals a wnid, the display name or any synset name of one class
               (case-insensitive, whole name); a name shared by several classes ("crane") is
               an error listing them with their wnids.
    substring: the entry equals a wnid, or is a case-insensitive substring of any name; any
               number of classes may match.
    Entries matching nothing raise one ValueError listing each with its close matches.
    """
    if match not in MATCH_MODES:
        raise ValueError(f"unknown match mode {match!r}; valid: {', '.join(MATCH_MODES)}")
    entries = parse_class_spec(spec)
    if not entries:
        raise ValueError(f"class spec {spec!r} names no classes")
    by_name: dict[str, list[ClassInfo]] = {}
    for c in classes:
        keys = {_norm(n) for n in _names_of(c)} | ({c.wnid.casefold()} if c.wnid else set())
        for key in keys:
            by_name.setdefault(key, []).append(c)

    out, unknown, ambiguous = [], [], []
    for entry in entries:
        key = _norm(entry)
        hits = list(by_name.get(key, []))
        if match == "substring" and not (hits and _WNID.match(key)):
            hits = [c for c in classes if any(key in _norm(n) for n in _names_of(c))]
        if not hits:
            unknown.append(entry)
        elif match == "exact" and len(hits) > 1:
            ambiguous.append(f"{entry!r} matches {', '.join(_label(c) for c in hits)}")
        else:
            out.append(ClassMatch(entry, tuple(sorted(hits, key=lambda c: c.index))))
    if ambiguous:
        raise ValueError(
            f"ambiguous class name(s), give the wnid instead: {'; '.join(ambiguous)}"
        )
    if unknown:
        hints = "; ".join(_suggest(e, classes) for e in unknown)
        raise ValueError(f"unknown class name(s): {hints}")
    return out


def _suggest(entry: str, classes: tuple[ClassInfo, ...]) -> str:
    vocab: dict[str, str] = {}
    for c in classes:
        for n in _names_of(c) + ([c.wnid] if c.wnid else []):
            vocab.setdefault(_norm(n), n)
    close = difflib.get_close_matches(_norm(entry), list(vocab), n=5, cutoff=0.6)
    hint = ", ".join(repr(vocab[k]) for k in close) if close else "none"
    return f"{entry!r} (close matches: {hint})"


def resolve_classes(
    spec: str | list[str], classes: tuple[ClassInfo, ...], *, match: str = "exact"
) -> list[ClassInfo]:
    """The classes named by ``spec`` (see ``match_classes``), each once, sorted by index."""
    found = {c.index: c for m in match_classes(spec, classes, match=match) for c in m.classes}
    return [found[i] for i in sorted(found)]


def describe_matches(matches: list[ClassMatch]) -> str:
    """One line per entry, "ENTRY -> wnid (name), ...", for users to check what matched.

    An entry that is the wnid it matched (as the preset's are) prints as "wnid (name)".
    """
    lines = []
    for m in matches:
        found = ", ".join(_label(c) for c in m.classes)
        same = len(m.classes) == 1 and (m.classes[0].wnid or "").casefold() == m.entry.casefold()
        lines.append(found if same else f"{m.entry} -> {found}")
    return "\n".join(lines)


__all__ = [
    "ImageNetClass",
    "ClassMatch",
    "PRESETS",
    "MATCH_MODES",
    "imagenet_classes",
    "class_info_for_folders",
    "preset_entries",
    "parse_class_spec",
    "match_classes",
    "resolve_classes",
    "describe_matches",
]
