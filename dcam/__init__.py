"""dcam: Diffusion-CAM audits for diffusion multimodal LLMs, at dataset scale.

One import namespace. An installed dcam (wheel or editable) holds its packages under `dcam`:

    dcam.pipeline    the Ray Data job: sources, decode, stages, sinks, manifest, CLI, report
    dcam.actors      what a worker hosts: model backends, probe, map variants, refinement, scores
    dcam.conf        the YAML configuration (package data)
    dcam.evals       evaluation harnesses (eval-cam, eval-tiny)
    dcam.benchmarks  every benchmark command and its baselines
    dcam.training    the model organism's training

The repository keeps those packages as top-level folders (pipeline/, actors/, conf/, ...), which
pyproject.toml maps into `dcam` (`[tool.setuptools.package-dir]`). In a plain source checkout
(no install, e.g. `python -m pytest` or a git worktree) the folders sit beside this file's
folder: they are added to this package's search path, so `dcam.pipeline` resolves to
`<checkout>/pipeline` either way and nothing else in the checkout becomes importable by a
generic name.
"""
from __future__ import annotations

import os

__version__ = "0.2.0"

_SUBPACKAGES = ("pipeline", "actors", "conf", "evals", "benchmarks", "training")


def _source_checkout_root() -> str | None:
    """The checkout root when this is dcam/ of a source checkout (subpackages beside it)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(here, "pipeline")):  # installed: subpackages live inside
        return None
    root = os.path.dirname(here)
    marker = os.path.join(root, "pyproject.toml")
    if not os.path.isfile(marker) or not os.path.isdir(os.path.join(root, "actors")):
        return None
    with open(marker, encoding="utf-8") as f:
        if 'name = "dcam"' not in f.read():
            return None
    return root


_root = _source_checkout_root()
if _root is not None and _root not in __path__:
    __path__.append(_root)
