"""The commands that look at results: report, info, demo."""

from __future__ import annotations

import json
from pathlib import Path

import click

from filterx.cli.common import DEVICE_HELP, common, finish, plain_json, setup
from filterx.cli.configs import inside
from filterx.cli.params import EXISTING_DIR
from filterx.cli.group import main


@main.command(short_help="Plots and report.md/.html of a dataset's scores.")
@click.argument("dataset", type=EXISTING_DIR)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for report.md/.html and the PNG plots (new, or an earlier report's).")
@click.option("--method", "methods", multiple=True, metavar="NAME",
              help="Stored score names to include (repeatable); default: all.")
@click.option("--fraction", default=0.1, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Selection cut to mark and evaluate.")
@click.option("--grid", default=16, show_default=True, type=click.IntRange(0),
              help="Top and bottom images shown per method (0: no image grids).")
@click.option("--relevant-classes", metavar="SPEC",
              help="Class names/wnids, @file or @office31: measure each selection's precision against them.")
@common
def report(dataset, output, methods, fraction, grid, relevant_classes, quiet, verbose, as_json):
    """Plots and a summary of DATASET's stored scores: histograms with the cut, per-class
    shares, overlap between methods, and the top- and bottom-scored images.

    Writes report.md, report.html and the PNG plots to the directory OUTPUT, replacing an
    earlier report there.

    \b
    Saves its options to: OUTPUT/filterx-report.yaml

    \b
    Example:
      filterx report ws/source -o ws/report --fraction 0.06 \\
          --relevant-classes @office31
    """
    from filterx.report.page import make_report

    setup(quiet, verbose)
    summary = make_report(dataset, output, methods=list(methods) or None, fraction=fraction, grid=grid,
                          relevant_classes=relevant_classes)
    finish(summary, as_json, inside(output, "report"))


@main.command(short_help="What a dataset dir holds (writes nothing).")
@click.argument("dataset", type=EXISTING_DIR)
@common
def info(dataset, quiet, verbose, as_json):
    """What a dataset dir holds: samples, classes, shards, embeddings, score arrays, and the
    options saved by the commands that wrote into it. Reads only; saves no options.

    Each tar's size is checked against its DALI index (no data is read): a truncated or
    missing tar, or an index that does not match its tar, is listed (DAMAGED / MISSING, and
    under "damaged_shards" / "missing_tars" with --json), a WARNING line says which shards
    readers will fail on, and the exit status is 1 (0 when every tar is whole).

    \b
    Example:
      filterx info ws/source
    """
    from filterx.report.info import dataset_info

    setup(quiet, verbose)
    details = dataset_info(dataset)
    if as_json:
        click.echo(json.dumps(plain_json(details.to_dict()), sort_keys=True, allow_nan=False))
        if not details.healthy:
            click.echo(f"filterx info: {details.warning()}", err=True)
    else:
        click.echo(details.text())
    if not details.healthy:
        click.get_current_context().exit(1)


@main.command(short_help="The whole chain on built-in sample data.")
@click.option("--out", default="filterx-demo", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Working directory (OUT) for the demo data and results.")
@click.option("--epochs", default=20, show_default=True, type=click.IntRange(1), help="Encoder training epochs.")
@click.option("--fraction", default=0.1, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Budget each method selects.")
@click.option("--seed", default=0, show_default=True, help="Seed of the sample data, training and scoring.")
@click.option("--quick", is_flag=True, help="A smaller pool and fewer epochs, for smoke tests (19 s on 2 CPU cores).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help=DEVICE_HELP)
@common
def demo(out, epochs, fraction, seed, quick, device, quiet, verbose, as_json):
    """Run the whole chain on built-in sample data and print each method's precision.

    Builds a pool (handwritten digits, photos, textures) and a target (digits 0-4 in another
    style), shards both, trains the target encoder, scores the pool with every method,
    selects a fraction, and reports how much of each selection is relevant, next to random.
    Everything goes under --out: data/, source/, target/, encoder.pt, manifests/ and the
    table in demo_results.md (and .json). A re-run reuses what is there. It runs with
    portable CPU numerics (FILTERX_PORTABLE=1: oneDNN and MKL pinned to AVX2, 2 threads), so
    that its table is as close across machines as torch allows.

    \b
    Saves its options to: OUT/filterx-demo.yaml

    \b
    Example:
      filterx demo --out /tmp/filterx-demo
    """
    import logging
    import sys

    from filterx.core import portable

    if "torch" not in sys.modules:  # a fresh process: the CLI imports torch only in commands
        portable.enable()
    setup(quiet, verbose)
    if not portable.active():
        logging.getLogger("filterx.stages.demo").warning(
            "torch was imported before the demo started: it runs with this machine's native CPU numerics, "
            "so its table may differ from the README's in the last digits")
    from filterx.stages.demo import DemoConfig, run_demo

    summary = run_demo(DemoConfig(out, epochs, fraction, seed, quick, device, quiet))
    finish(summary, as_json, inside(out, "demo"))


if __name__ == "__main__":
    main()
