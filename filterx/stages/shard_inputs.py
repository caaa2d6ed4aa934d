"""The inputs of ``shard``: an ImageFolder tree or a list file -> (relative path, label) items.

Both listers return ``Inputs``: the items in input order, the class names (label ``i`` is
``class_names[i]``; label -1: unlabelled), the root that relative paths refer to, and the
entries that were not listed, each with its reason, for ``shard_report.json``.

List files hold ``path[,label]`` lines; blank lines and ``#`` comments are ignored. Labels
are either all integers (class indexes) or all class names (sorted to indexes); these are
errors that name the line:

- a label of the other kind than most lines' (``1O`` among integers), an empty label
  (``a.jpg,``), a negative or non-integer number (``-1``, ``1.5``);
- an integer label >= the number of labelled lines, unless ``num_classes`` is given (then
  every label must be < ``num_classes``): a typo such as ``99999999`` would otherwise make
  that many classes;
- a label on some lines and not on others.

A first line ``path,label`` (any of ``HEADER_PATHS``, then any of ``HEADER_LABELS``, any
case) is a header: it is skipped, and the log says so.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

HEADER_PATHS = ("path", "file", "filename", "file_name", "filepath", "file_path", "image", "image_path", "img")
HEADER_LABELS = ("label", "labels", "class", "class_name", "classname", "cls", "category", "target")
_INTEGER = re.compile(r"[0-9]+")
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


@dataclass(frozen=True)
class Inputs:
    items: list[tuple[str, int]]  # (path relative to root, label), in input order
    class_names: list[str]
    root: Path
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}: entries not listed


# ---------------------------------------------------------------- ImageFolder


def list_image_folder(src: Path) -> Inputs:
    """Files of an ImageFolder tree, labelled by their class folder (sorted names).

    Every regular, non-hidden file is an input: whether it is an image is decided by the
    scan, so that non-images are reported rather than silently ignored. Symlinked folders are
    followed; one that leads to a folder already listed (a symlink loop, or a second link to
    the same folder) is skipped and reported.
    """
    classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{src} has no class sub-folders; expected SRC/<class>/<image> files")
    items: list[tuple[str, int]] = []
    skipped: list[dict] = []
    seen = {_dir_id(src): "."}  # (device, inode) of each folder listed -> its path under src
    for label, cls in enumerate(classes):
        top = src / cls
        if (earlier := seen.get(_dir_id(top))) is not None:
            skipped.append({"path": cls, "reason": f"same folder as {earlier!r}, already listed"})
            continue
        seen[_dir_id(top)] = cls
        for root, dirs, files in os.walk(top, followlinks=True):
            keep = []
            for d in sorted(d for d in dirs if not d.startswith(".")):
                path = os.path.join(root, d)
                rel = os.path.relpath(path, src)
                try:
                    key = _dir_id(Path(path))
                except OSError as exc:
                    skipped.append({"path": rel, "reason": f"cannot read folder ({exc.strerror or exc})"})
                    continue
                if key in seen:
                    skipped.append({"path": rel, "reason": _revisit_reason(Path(path), seen[key])})
                    continue
                seen[key] = rel
                keep.append(d)
            dirs[:] = keep
            for f in sorted(files):
                if not f.startswith("."):
                    items.append((os.path.relpath(os.path.join(root, f), src), label))
    return Inputs(items, classes, src, skipped)


def _dir_id(path: Path) -> tuple[int, int]:
    st = path.stat()  # follows symlinks: the folder a link leads to
    return st.st_dev, st.st_ino


def _revisit_reason(path: Path, first: str) -> str:
    target, parent = os.path.realpath(path), os.path.realpath(path.parent)
    loop = parent == target or parent.startswith(target.rstrip(os.sep) + os.sep)
    what = "directory symlink loop: leads back to" if loop else "same folder as"
    return f"{what} {first!r}, already listed; not followed"


# ---------------------------------------------------------------- list files


def _is_header(path: str, label: str | None) -> bool:
    return path.lower() in HEADER_PATHS and (label is None or label.lower() in HEADER_LABELS)


def list_file(src: Path, num_classes: int | None = None) -> Inputs:
    """Parse a list file of ``path[,label]`` lines (rules in the module doc).

    Paths are relative to the list file's directory unless absolute. ValueError naming the
    file and line for every malformed label.
    """
    rows: list[tuple[str, str | None, int]] = []  # (path, label or None, line number)
    first = True
    for n, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, sep, label = line.rpartition(",") if "," in line else (line, "", "")
        path, label = path.strip(), (label.strip() if sep else None)
        if first and _is_header(path, label):
            log.info("list file %s: line %d (%r) is a header; skipped", src, n, line)
        else:
            rows.append((path, label, n))
        first = False
    where = f"list file {src}"
    if not rows:
        raise ValueError(f"{where} holds no paths")
    labelled = [r for r in rows if r[1] is not None]
    if labelled and len(labelled) != len(rows):
        odd = next(r for r in rows if (r[1] is None) != (rows[0][1] is None))
        raise ValueError(f"{where} line {odd[2]}: {'no label' if odd[1] is None else 'a label'}, unlike line "
                         f"{rows[0][2]}; give a label on every line or on none")
    if not labelled:
        if num_classes is not None:
            raise ValueError(f"--num-classes {num_classes} needs integer labels, but {where} has no labels")
        return Inputs([(p, -1) for p, _, _ in rows], [], src.parent)
    for p, g, n in rows:
        if not p:
            raise ValueError(f"{where} line {n}: no path before the label {g!r}")
        if not g:
            raise ValueError(f"{where} line {n}: empty label after the comma ({p!r}); give a label or remove the comma")
    integers = sum(bool(_INTEGER.fullmatch(g)) for _, g, _ in rows)
    if integers * 2 >= len(rows):
        return _integer_labels(rows, integers, num_classes, where, src.parent)
    return _named_labels(rows, num_classes, where, src.parent)


def _integer_labels(rows, integers: int, num_classes: int | None, where: str, root: Path) -> Inputs:
    for _, g, n in rows:
        if not _INTEGER.fullmatch(g):
            kind = ("a negative number" if g.startswith("-") and _NUMBER.fullmatch(g) else
                    "a number but not a class index" if _NUMBER.fullmatch(g) else "a class name")
            raise ValueError(f"{where} line {n}: label {g!r} is {kind}, but {integers} lines have integer "
                             "labels (class indexes >= 0); use integers on every line or class names on every line")
    labels = [int(g) for _, g, _ in rows]
    limit = len(rows) if num_classes is None else num_classes
    for lab, (_, g, n) in zip(labels, rows):
        if lab >= limit:
            if num_classes is None:
                raise ValueError(f"{where} line {n}: label {lab} is >= the number of labelled lines ({len(rows)}); "
                                 f"integer labels are class indexes: pass --num-classes N if there really are "
                                 f"more than {lab} classes")
            raise ValueError(f"{where} line {n}: label {lab} is not < --num-classes {num_classes}")
    count = max(labels) + 1 if num_classes is None else num_classes
    return Inputs([(p, lab) for (p, _, _), lab in zip(rows, labels)], [str(i) for i in range(count)], root)


def _named_labels(rows, num_classes: int | None, where: str, root: Path) -> Inputs:
    names = sum(not _NUMBER.fullmatch(g) for _, g, _ in rows)
    for _, g, n in rows:
        if _NUMBER.fullmatch(g):
            kind = "an integer" if _INTEGER.fullmatch(g) else "a number"
            raise ValueError(f"{where} line {n}: label {g!r} is {kind}, but {names} lines have class names; "
                             "use class names on every line or integer class indexes on every line")
    if num_classes is not None:
        raise ValueError(f"--num-classes {num_classes} applies to integer labels; {where} has class names "
                         f"(e.g. {rows[0][1]!r} on line {rows[0][2]})")
    classes = sorted({g for _, g, _ in rows})
    to_index = {c: i for i, c in enumerate(classes)}
    return Inputs([(p, to_index[g]) for p, g, _ in rows], classes, root)
