"""Build hook (everything else is in pyproject.toml): a built wheel carries the shipped model,
``checkpoints/flickr8k_cs_lite0.pt``, as the package data ``sca_caption/shipped/flickr8k_cs_lite0.pt``
(where ``captioning.shipped_checkpoint`` looks first), copied at build time so that git keeps one
copy. An editable install finds it in ``checkpoints/`` beside the package instead."""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED_MODEL = Path(__file__).resolve().parent / "checkpoints" / "flickr8k_cs_lite0.pt"


class BuildWithShippedModel(build_py):
    """``build_py`` that also copies the shipped model into the built package."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        if not SHIPPED_MODEL.is_file():
            raise SystemExit(f"error: {SHIPPED_MODEL} is missing: a wheel without the shipped model cannot caption")
        target = Path(self.build_lib) / "sca_caption" / "shipped" / SHIPPED_MODEL.name
        self.mkpath(str(target.parent))
        self.copy_file(str(SHIPPED_MODEL), str(target))


setup(cmdclass={"build_py": BuildWithShippedModel})
