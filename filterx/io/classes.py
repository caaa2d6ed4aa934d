"""Class metadata and class-name specs: which source classes a user means by "coffee mug".

The ImageNet-1k class list ships as package data (``data/imagenet1k_synsets.txt``, line i =
class index i: wnid, then comma-separated synset names). A pool's classes are
``ClassInfo(index, name, wnid)`` records (``class_info_for_folders`` builds them for an
ImageFolder); ``resolve_classes`` turns a user's spec into the classes it names:

    spec = "coffee mug, n03793489"      # names or wnids, comma-separated
    spec = "@my_classes.txt"            # one name or wnid per line, '#' starts a comment
    spec = "@office31"                  # the preset: 47 ImageNet classes related to Office-31

    resolve_classes(spec, classes)                     # -> [ClassInfo, ...] sorted by index
    print(describe_matches(match_classes(spec, classes)))   # what each entry matched

A target's class may have no counterpart in the pool: the pool is part of ImageNet, or a
preset names classes it lacks. ``absent`` says what an entry naming an ImageNet-1k class the
pool lacks gives: "error" (the default) raises ``AbsentClassesError`` naming it; "report"
returns it as a ``ClassMatch`` with no classes, which ``describe_matches`` prints as
"ENTRY -> not in the pool", so that the caller can skip it and say so; "preset" does that for
a preset's entries (a fixed list, not written for this pool) and raises for names the user
wrote. An entry naming neither a pool class nor an ImageNet class is always an error (most
likely a typo), with close matches; so is a spec of which no entry names a pool class.

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

from filterx.io.dataset import ClassInfo

# Named presets for "@NAME" specs: package data files listing {"entry", "wnid", "name"} (the
# ImageNet class: the entry's wording, its wnid, its synset names) and, for @office31, the
# Office-31 category the class stands for ("office31"; e.g. "notebook" is ImageNet's notebook
# computer, so laptop_computer, not paper_notebook). Only the wnid is matched.
PRESETS = {"office31": "office31_imagenet.json"}

MATCH_MODES = ("exact", "substring")
ABSENT_MODES = ("error", "preset", "report")

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


class AbsentClassesError(ValueError):
    """Entries the user wrote name ImageNet classes the pool lacks; ``missing``: their labels."""

    def __init__(self, message: str, missing: list[str]) -> None:
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True)
class ClassMatch:
    """What one entry of a spec matched: ``classes`` sorted by index; empty only for an entry
    naming an ImageNet class the pool lacks, which ``match_classes`` returns under
    ``absent="report"`` (or ``"preset"``, for a preset's entries)."""

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
    """The rows {"entry", "wnid", "name", ...} of preset ``name`` (see ``PRESETS``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown class preset @{name}; valid presets: {sorted(PRESETS)}")
    return json.loads(_read_data(PRESETS[name]))


def parse_class_spec(spec: str | list[str]) -> list[str]:
    """The entries (names or wnids) of a spec, in order, blanks dropped.

    A string is comma-separated entries, or "@PRESET" (a name in ``PRESETS``; presets win over
    a file of the same name, write "@./office31" for the file), or "@PATH": a text file with
    one entry per line, '#' starting a comment. A list is several such strings.
    """
    return [entry for entry, _ in _spec_entries(spec)]


def _spec_entries(spec: str | list[str]) -> list[tuple[str, bool]]:
    """(entry, from a preset) for each entry of ``spec`` (see ``parse_class_spec``)."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    entries: list[tuple[str, bool]] = []
    for part in parts:
        part = part.strip()
        if part.startswith("@"):
            ref = part[1:].strip()
            if ref in PRESETS:
                entries += [(row["wnid"], True) for row in preset_entries(ref)]
                continue
            path = Path(ref).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"class list file {str(path)!r} not found (from spec {part!r}); "
                    f"presets: {', '.join('@' + p for p in sorted(PRESETS))}"
                )
            lines = path.read_text(encoding="utf-8").splitlines()
            entries += [(ln.split("#", 1)[0].strip(), False) for ln in lines]
        else:
            entries += [(e, False) for e in part.split(",")]
    return [(e.strip(), preset) for e, preset in entries if e.strip()]


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


def _imagenet_pool() -> tuple[ClassInfo, ...]:
    return tuple(ClassInfo(c.index, c.name, c.wnid) for c in imagenet_classes())


def _hits(key: str, by_name: dict[str, list[ClassInfo]], classes, match: str) -> list[ClassInfo]:
    """The classes an entry (normalised ``key``) names among ``classes`` (see match_classes)."""
    hits = list(by_name.get(key, []))
    if match == "substring" and not (hits and _WNID.match(key)):
        hits = [c for c in classes if any(key in _norm(n) for n in _names_of(c))]
    return hits


def _names_index(classes) -> dict[str, list[ClassInfo]]:
    by_name: dict[str, list[ClassInfo]] = {}
    for c in classes:
        keys = {_norm(n) for n in _names_of(c)} | ({c.wnid.casefold()} if c.wnid else set())
        for key in keys:
            by_name.setdefault(key, []).append(c)
    return by_name


@functools.cache
def _imagenet_names_index() -> dict[str, list[ClassInfo]]:
    return _names_index(_imagenet_pool())


def _imagenet_label(entry: str, match: str) -> str | None:
    """How to name an entry that is an ImageNet-1k class ("n04557648 (water bottle)"), None if
    it names none. Decides absent (a real class the pool lacks) from unknown (a typo)."""
    hits = _hits(_norm(entry), _imagenet_names_index(), _imagenet_pool(), match)
    if not hits:
        return None
    if len(hits) == 1 and (hits[0].wnid or "").casefold() == entry.casefold():
        return _label(hits[0])
    if len(hits) == 1:
        return f"{entry!r} ({hits[0].wnid})"
    shown = ", ".join(_label(c) for c in hits[:3]) + (", ..." if len(hits) > 3 else "")
    return f"{entry!r} (ImageNet: {shown})"


def _listing(items: list[str], limit: int = 8) -> str:
    """The first ``limit`` items, comma-separated, then how many more (keeps errors one line)."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def match_classes(
    spec: str | list[str], classes: tuple[ClassInfo, ...], *, match: str = "exact",
    absent: str = "error",
) -> list[ClassMatch]:
    """What each entry of ``spec`` (see ``parse_class_spec``) names among ``classes``.

    exact:     the entry equals a wnid, the display name or any synset name of one class
               (case-insensitive, whole name); a name shared by several classes ("crane") is
               an error listing them with their wnids.
    substring: the entry equals a wnid, or is a case-insensitive substring of any name; any
               number of classes may match.
    Entries matching no pool class raise one ValueError listing each with its close matches,
    except entries that name an ImageNet-1k class (a wnid or one of its names): those raise
    ``AbsentClassesError`` (a ValueError) naming them under ``absent="error"``, and give
    ``ClassMatch(entry, ())``, in spec order with the others, under ``absent="report"``, or
    under ``absent="preset"`` where they come from a preset. A spec of which no entry names a
    pool class is an error in every mode.
    """
    if match not in MATCH_MODES:
        raise ValueError(f"unknown match mode {match!r}; valid: {', '.join(MATCH_MODES)}")
    if absent not in ABSENT_MODES:
        raise ValueError(f"unknown absent mode {absent!r}; valid: {', '.join(ABSENT_MODES)}")
    entries = _spec_entries(spec)
    if not entries:
        raise ValueError(f"class spec {spec!r} names no classes")
    by_name = _names_index(classes)

    out, unknown, missing, written, ambiguous = [], [], [], [], []
    for entry, from_preset in entries:
        hits = _hits(_norm(entry), by_name, classes, match)
        if not hits:
            label = _imagenet_label(entry, match)
            if label is None:
                unknown.append(entry)
            else:
                missing.append(label)
                if absent == "error" or (absent == "preset" and not from_preset):
                    written.append(label)
                out.append(ClassMatch(entry, ()))
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
        raise ValueError(f"unknown class name(s), in neither the pool nor ImageNet-1k: {hints}")
    pool = f"the pool ({len(classes)} classes, e.g. {_listing([_label(c) for c in classes], 3)})"
    if missing and all(not m.classes for m in out):
        raise ValueError(f"none of the {len(entries)} classes named by {_spec_text(spec)} is in "
                         f"{pool}; missing: {_listing(missing)}")
    if written:
        raise AbsentClassesError(
            f"{len(written)} of the {len(entries)} classes named by {_spec_text(spec)} are not in "
            f"{pool}: {_listing(written)}", written)
    return out


def _spec_text(spec: str | list[str]) -> str:
    text = spec if isinstance(spec, str) else ", ".join(spec)
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _suggest(entry: str, classes: tuple[ClassInfo, ...]) -> str:
    vocab: dict[str, str] = {}
    for c in classes:
        for n in _names_of(c) + ([c.wnid] if c.wnid else []):
            vocab.setdefault(_norm(n), n)
    close = difflib.get_close_matches(_norm(entry), list(vocab), n=5, cutoff=0.6)
    hint = ", ".join(repr(vocab[k]) for k in close) if close else "none"
    return f"{entry!r} (close matches: {hint})"


def resolve_classes(
    spec: str | list[str], classes: tuple[ClassInfo, ...], *, match: str = "exact",
    absent: str = "error",
) -> list[ClassInfo]:
    """The classes named by ``spec`` (see ``match_classes``), each once, sorted by index.

    Under ``absent="report"`` or ``"preset"`` the entries the pool lacks are left out: call
    ``match_classes`` and ``absent_entries`` to tell the user which."""
    matches = match_classes(spec, classes, match=match, absent=absent)
    found = {c.index: c for m in matches for c in m.classes}
    return [found[i] for i in sorted(found)]


def absent_entries(matches: list[ClassMatch]) -> list[str]:
    """The entries of ``matches`` that named no pool class (ImageNet classes the pool lacks)."""
    return [m.entry for m in matches if not m.classes]


def describe_matches(matches: list[ClassMatch]) -> str:
    """One line per entry, "ENTRY -> wnid (name), ...", for users to check what matched.

    An entry that is the wnid it matched (as the preset's are) prints as "wnid (name)"; an
    entry the pool lacks as "ENTRY -> not in the pool" (a preset's wnid with its ImageNet name).
    """
    lines = []
    for m in matches:
        if not m.classes:
            label = _imagenet_label(m.entry, "exact") if _WNID.match(_norm(m.entry)) else None
            lines.append(f"{label or m.entry} -> not in the pool")
            continue
        found = ", ".join(_label(c) for c in m.classes)
        same = len(m.classes) == 1 and (m.classes[0].wnid or "").casefold() == m.entry.casefold()
        lines.append(found if same else f"{m.entry} -> {found}")
    return "\n".join(lines)


__all__ = [
    "ImageNetClass",
    "ClassMatch",
    "PRESETS",
    "MATCH_MODES",
    "ABSENT_MODES",
    "AbsentClassesError",
    "imagenet_classes",
    "class_info_for_folders",
    "preset_entries",
    "parse_class_spec",
    "match_classes",
    "resolve_classes",
    "absent_entries",
    "describe_matches",
]
