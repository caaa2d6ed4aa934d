"""``filterx score``'s method options, made from the scorer registry (each scorer declares its
options once, ``register_scorer(options=...)``), and the command class that adds them."""

from __future__ import annotations

import click

from filterx.cli.params import DefaultOption


def _option_type(scorer, name: str, opt, choices):
    """The click type of scorer parameter ``name``: a choice, a bounded number, a flag, a list."""
    import typing

    if choices:
        return click.Choice(list(choices))
    kind = scorer.types.get(name)
    args = [a for a in (typing.get_args(kind) or (kind,)) if a is not type(None)]
    base = args[0] if args else str
    if base is bool:
        return bool
    if base is int:
        return click.IntRange(opt.min) if opt.min is not None else int
    if base is float:
        return click.FloatRange(opt.min) if opt.min is not None else float
    return str


def scorer_options() -> list[click.Option]:
    """``filterx score``'s method options, made from the scorer registry: one ``--NAME`` per
    parameter some scorer declares as an Option, its help naming each method that takes it
    (with that method's default), its choices and bounds those declared."""
    from filterx.scorers import AUTO, all_scorers

    by_name: dict[str, list] = {}
    for scorer in all_scorers():
        method = scorer.variant_of or scorer.name
        for name, opt in scorer.options.items():
            seen = by_name.setdefault(name, [])
            if method not in [m for m, *_ in seen]:
                seen.append((method, scorer, opt))
    variants = {}
    for scorer in all_scorers():
        if scorer.variant_of:
            variants.setdefault(scorer.variant_of, []).append(scorer.choose_by[1])
    options = []
    for name, takers in by_name.items():
        _, first, opt = takers[0]
        # the parameter that chooses among a method's variants (--params, --on) takes their values
        choosing = first.choose_by is not None and first.choose_by[0] == name
        auto = (AUTO,) if choosing and first.choose_auto else ()
        choices = (*auto, first.choose_by[1], *variants.get(first.name, ())) if choosing else opt.choices
        defaults = [(auto or first.choose_by[1:])[0] if choosing and m == first.name else sc.defaults.get(name)
                    for m, sc, _ in takers]
        shown = [d for d in defaults if d not in (None, "", 0, False)]
        several = len({repr(d) for d in shown}) > 1
        helps: dict[str, list[str]] = {}  # help text -> the methods it is about
        for (method, _, o), default in zip(takers, defaults):
            text = o.help + (f" ({default})" if several and default in shown else "")
            helps.setdefault(text, []).append(method)
        kind = _option_type(first, name, opt, choices)
        flag = kind is bool
        show = None if flag or not shown else ("per method" if several else str(shown[0]))
        text = "; ".join(f"{', '.join(methods)}: {h}" for h, methods in helps.items()) + "."
        # a choosing parameter is not one of the scorer's own: its value arrives as NAME_
        dest = f"{name}_" if choosing else name
        options.append(DefaultOption([f"--{name.replace('_', '-')}", dest], is_flag=flag, default=None,
                                     type=None if flag else kind, metavar=opt.metavar, show_default=show,
                                     help=text))
    return options


class ScoreCommand(click.Command):
    """A command whose scorer options come from the registry (:func:`scorer_options`), added
    when its parameters are first asked for (parsing, --help), so that importing the CLI
    imports no scorer."""

    @property
    def params(self):
        if not self._scorer_options_added:
            self._scorer_options_added = True
            at = next(i for i, p in enumerate(self._params) if p.name == "extra")
            self._params[at:at] = scorer_options()
        return self._params

    @params.setter
    def params(self, value):
        self._params, self._scorer_options_added = value, False
