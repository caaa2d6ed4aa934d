"""The parameter types and option classes of the ``filterx`` commands: choices read from a
registry, options whose default comes from elsewhere, ``--encoder`` files and specs."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import click


class RegistryChoice(click.ParamType):
    """A choice among the names of a registry, read only when needed (the model registry imports
    torch, which would slow down every command's start and --help); the error lists them all."""

    def __init__(self, what: str, names: Callable[[], Sequence[str]], metavar: str | None = None):
        self.name, self.names, self._metavar = what, names, metavar

    def convert(self, value, param, ctx):
        choices = list(self.names())
        if value not in choices:
            self.fail(f"unknown {self.name} {value!r}; valid {self.name}s: {', '.join(choices)}", param, ctx)
        return value

    def get_metavar(self, param, ctx=None):
        return self._metavar or "[" + "|".join(self.names()) + "]"

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        return [CompletionItem(n) for n in self.names() if n.startswith(incomplete)]


class DefaultOption(click.Option):
    """An option left unset (None) whose value then comes from elsewhere (a config dataclass, a
    scorer's defaults): ``show_default="90"`` shows "[default: 90]", without the parentheses
    click puts around a string default."""

    def get_help_extra(self, ctx):
        extra = super().get_help_extra(ctx)
        if isinstance(self.show_default, str):
            extra["default"] = self.show_default
        return extra


class ListedOption(click.Option):
    """An option of a RegistryChoice type whose --help lists the names in its help text,
    where they wrap (a long [a|b|...] metavar would run past 80 columns)."""

    def get_help_record(self, ctx):
        base = self.help
        self.help = f"{base} One of: {', '.join(self.type.names())}."
        try:
            return super().get_help_record(ctx)
        finally:
            self.help = base


EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


class EncoderParam(click.Path):
    """--encoder: an encoder file (from train-encoder) or a backbone spec such as
    ``torchvision:resnet50:IMAGENET1K_V2`` (filterx.models.backbones); a spec comes back as its
    canonical string (a weights file made absolute), a file as a Path. ``spec_only``: a
    backbone spec and nothing else (train-encoder --backbone)."""

    def __init__(self, spec_only: bool = False):
        super().__init__(exists=True, dir_okay=False, path_type=Path)
        self.spec_only = spec_only
        self.name = "backbone" if spec_only else "encoder"

    def convert(self, value, param, ctx):
        from filterx.models import backbones

        text = str(value)
        if self.spec_only or (not isinstance(value, Path) and backbones.looks_like_spec(text)):
            try:
                return backbones.parse_spec(text).text
            except (ValueError, FileNotFoundError) as exc:
                self.fail(str(exc), param, ctx)
        lib, sep, _ = text.partition(":")
        if self.exists and sep and "/" not in lib and not Path(text).expanduser().exists():
            # meant as a spec, of a library filterx does not know
            self.fail(f"bad encoder {text!r}: no such file, and {lib!r} is not a backbone library "
                      f"({', '.join(backbones.LIBRARIES)}); valid: {backbones.FORMS}", param, ctx)
        return super().convert(value, param, ctx)

    def get_metavar(self, param, ctx=None):
        return "SPEC" if self.spec_only else "FILE|SPEC"


ENCODER = EncoderParam()
BACKBONE = EncoderParam(spec_only=True)


# ---------------------------------------------------------------- options made from config dataclasses


class ConfigChoice(click.Choice):
    """A click.Choice among names a library module declares (``names()`` returns them), read
    when first needed: the trainers' modules import torch, which --help of other commands must
    not wait for."""

    def __init__(self, names: Callable[[], Sequence[str]]):
        self._names = names
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self._names())


class ConfigOption(DefaultOption):
    """An option whose default is a field of a config dataclass (``config()`` returns the class,
    imported when first needed; ``field``: the field's name, the option's by default), so that
    changing the dataclass changes the option and its --help.

    ``unset=False``: the option's default is the field's (as a string for a string choice).
    ``unset=True``: the option is None when not given and the command passes only what was set,
    so that the config's default applies, or a recipe's (pretrain --objective moco); --help
    shows the field's default, or ``show_default`` where the text says more than a value (an
    arch's lr, a default_factory's rule); saved options files write the field's default.
    Non-flag options need an explicit ``type`` (click cannot infer it from a deferred default).
    """

    def __init__(self, *decls, config: Callable[[], type], field: str | None = None, unset: bool = False, **kwargs):
        if not unset:
            kwargs["default"] = self.cli_default
        kwargs.setdefault("show_default", True)
        super().__init__(*decls, **kwargs)
        self.config, self.field_name, self.unset = config, field or self.name, unset

    def config_default(self):
        """The field's default; None for a field without one (required, or a default_factory:
        its value depends on the machine)."""
        import dataclasses

        fields = {f.name: f for f in dataclasses.fields(self.config())}
        if self.field_name not in fields:
            raise AssertionError(f"{self.config().__name__} has no field {self.field_name!r} for {self.opts[0]}")
        default = fields[self.field_name].default
        return None if default is dataclasses.MISSING else default

    def cli_default(self):
        """The field's default as the option's parser gives it (a string choice gets its string)."""
        value = self.config_default()
        if value is not None and isinstance(self.type, click.Choice) and not isinstance(value, str):
            return str(value)
        return value

    def saved_default(self):
        """What an options file records when the option was not given."""
        return self.config_default() if self.unset else self.cli_default()

    def get_help_extra(self, ctx):
        extra = super().get_help_extra(ctx)
        if not isinstance(self.show_default, str) and self.show_default:
            value = self.cli_default()
            if value is None:
                extra.pop("default", None)
            else:
                extra["default"] = str(value)
        return extra
