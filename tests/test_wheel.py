"""A wheel built from the repository carries the shipped model: built offline (``pip wheel
--no-build-isolation``) from a copy of the files a build reads, so that the checkout gets no
build/ or egg-info, installed without dependencies in a fresh virtual environment that borrows
this environment's packages, it captions an image from another folder with no checkpoint named."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from caption_support import shape_image

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "flickr8k_cs_lite0.pt"
BUILD_FILES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "checkpoints/README.md", "checkpoints/flickr8k_cs_lite0.pt")


def _run(*command: str | Path, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command}:\n{done.stdout}\n{done.stderr}"
    return done


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_built_wheel_captions_with_its_shipped_model_from_another_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PIP_REQUIRE_VIRTUALENV")}
    source = tmp_path / "source"
    for name in BUILD_FILES:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "sca_caption", source / "sca_caption", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", dist, ".",
         cwd=source, env=env)
    (wheel,) = dist.glob("sca_caption-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        models = [name for name in archive.namelist() if name.endswith(".pt")]
    assert models == ["sca_caption/shipped/flickr8k_cs_lite0.pt"]

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path, env=env)
    python = venv / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path, env=env).stdout.strip())
    _run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", site, wheel, cwd=tmp_path, env=env)
    # the dependencies: this environment's packages, after the venv's own (its .pth files, such as
    # an editable install of this checkout, stay inactive)
    borrowed = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site / "borrowed_dependencies.pth").write_text("".join(f"{path}\n" for path in borrowed))
    installed = site / "sca_caption" / "shipped" / "flickr8k_cs_lite0.pt"
    assert _sha256(installed) == _sha256(SHIPPED)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shape_image(elsewhere / "ball.png", (220, 40, 40), (20, 30, 80, 90))
    done = _run(python, "-m", "sca_caption.caption", "--device", "cpu", "--workers", "0", "ball.png", cwd=elsewhere, env=env)
    assert done.stderr.splitlines() == [
        f"note: no --checkpoint given: using {installed.resolve()} (the shipped Flickr8k model, installed with the package)"
    ]
    (line,) = done.stdout.splitlines()
    path, caption = line.split("\t")
    assert path == "ball.png" and caption.split()
