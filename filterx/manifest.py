"""Reading a selection from other training code: ``from filterx.manifest import read_manifest,
ManifestDataset``. The public import path the README shows; the formats themselves live in
:mod:`filterx.io.manifest`."""

from filterx.io.manifest import Manifest, ManifestDataset, read_manifest

__all__ = ["Manifest", "ManifestDataset", "read_manifest"]
