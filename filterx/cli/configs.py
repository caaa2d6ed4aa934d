"""The options files of ``filterx`` commands: the one ``--config`` reads, and the one each run saves
next to its outputs (``save_config``), repeatable with ``--config``.

Where a run's options are saved (``save_config``):

- a command that writes a directory (shard OUT, pretrain/finetune OUT, report -o, demo --out,
  select --format wds): ``<dir>/filterx-<command>.yaml`` (``inside``);
- a command that writes into a dataset dir (embed, score): ``<dataset>/configs/<command>-<name>.yaml``
  (``in_dataset``; name: the encoder tag for embed, the score name for score);
- a command that writes one file (train-encoder OUT, select -o FILE): ``<file>.filterx.yaml``
  (``beside``).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import click

from filterx.cli.params import ConfigOption


def load_config(ctx: click.Context, param, value):
    """--config FILE.yaml: option values for this command (keys as on the command line, with or
    without the leading dashes); options given on the command line win."""
    if value is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(Path(value).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise click.BadParameter(f"cannot read {value}: {exc}", ctx=ctx, param=param) from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{value} must hold a mapping of option: value", ctx=ctx, param=param)
    # keys as spelled on the command line: long option names, or argument names
    spelling = {}
    for p in ctx.command.params:
        if p.name == "config":
            continue
        opts = [o for o in p.opts if o.startswith("--")] or ([p.name] if isinstance(p, click.Argument) else p.opts)
        for o in opts:
            spelling[o.lstrip("-").replace("_", "-").lower()] = p.name
    defaults = {}
    for key, v in data.items():
        name = spelling.get(str(key).lstrip("-").replace("_", "-").lower())
        if name is None:
            raise click.BadParameter(f"{value}: {key!r} is not an option of this command; valid: "
                                     f"{', '.join(sorted(spelling))}", ctx=ctx, param=param)
        defaults[name] = v
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


# Not part of what a run computes: left out of saved configs.
# How a run was run, not what it computed (outputs are the same under every runner): a saved
# file repeats the run anywhere, without joining the cluster it ran on.
_NOT_SAVED = ("quiet", "verbose", "as_json", "runner", "address", "actors")
# Options holding a class spec, where "@path" names a file.
_CLASS_SPECS = ("classes", "relevant_classes")
def _own_default(param: click.Parameter):
    """The value ``param`` stands for when not given, as an options file records it: a config
    option's field default (also for one left unset, which the config then fills in), else the
    option's own default (None: none)."""
    return param.saved_default() if isinstance(param, ConfigOption) else param.default


def _config_key(param: click.Parameter) -> str:
    """How a config file names ``param``: its long option name without dashes, or the argument's name."""
    longs = [o[2:] for o in param.opts if o.startswith("--")]
    return longs[0] if longs and isinstance(param, click.Option) else param.name.replace("_", "-")


def _portable(name: str, value):
    """``value`` as it must be saved to mean the same from any directory: absolute paths
    (also a class spec's ``@file``), lists for tuples."""
    if isinstance(value, Path):
        return os.path.abspath(os.path.expanduser(value))
    if isinstance(value, (tuple, list)):
        return [_portable(name, v) for v in value]
    if name in _CLASS_SPECS and isinstance(value, str) and value.startswith("@"):
        from filterx.io.classes import PRESETS

        ref = value[1:].strip()
        if ref not in PRESETS and Path(ref).expanduser().is_file():
            return "@" + os.path.abspath(os.path.expanduser(ref))
    return value


def resolved_options(ctx: click.Context) -> dict:
    """Every option and argument of the running command (defaults included, after --config and
    the command line are merged), keyed as a config file spells them; -q/-v/--json left out."""
    values = {}
    for p in ctx.command.params:
        if not p.expose_value or p.name in _NOT_SAVED:
            continue
        value = ctx.params.get(p.name)
        if value is None:
            value = _own_default(p) if isinstance(p, ConfigOption) else None
        values[_config_key(p)] = _portable(p.name, value)
    return values


def command_line(ctx: click.Context, values: dict) -> str:
    """The shortest command line that gives ``values`` (options at their default left out)."""
    words = ["filterx", ctx.command.name]
    for p in ctx.command.params:
        key = _config_key(p)
        if key not in values:
            continue
        value = values[key]
        if isinstance(p, click.Argument):
            words.append(shlex.quote(str(value)))
        elif value is None or value is False or value in ([], ()) \
                or value == _portable(p.name, _own_default(p)):
            continue
        elif getattr(p, "is_flag", False):
            words.append(f"--{key}")
        else:
            for v in value if isinstance(value, list) else [value]:
                words += [f"--{key}", shlex.quote(str(v))]
    return " ".join(words)


def save_config(ctx: click.Context, path: Path) -> Path:
    """Write the running command's options to ``path`` (atomically) as YAML that ``--config``
    reads back. No timestamps: the same run saves the same bytes."""
    import yaml

    import filterx
    from filterx.io import atomic

    values = resolved_options(ctx)
    name = ctx.command.name
    text = (f"# options of a `filterx {name}` run (filterx {filterx.__version__}); "
            f"repeat it with: filterx {name} --config THIS_FILE\n"
            f"# the same as: {command_line(ctx, values)}\n"
            + yaml.safe_dump(values, sort_keys=False, allow_unicode=True, default_flow_style=False,
                             width=float("inf")))
    atomic.write_text(path, text)
    return path


def beside(path: Path) -> Path:
    """Where the options of a run that wrote the single file ``path`` go."""
    path = Path(os.path.abspath(os.path.expanduser(path)))
    return path.with_name(path.name + ".filterx.yaml")


def inside(directory: Path, command: str) -> Path:
    """Where the options of a run that wrote ``directory`` go."""
    return Path(os.path.abspath(os.path.expanduser(directory))) / f"filterx-{command}.yaml"


def in_dataset(dataset: Path, command: str, name: str) -> Path:
    """Where the options of a run that wrote into the dataset dir ``dataset`` go."""
    from filterx.report.info import CONFIGS

    return Path(dataset) / CONFIGS / f"{command}-{name}.yaml"
