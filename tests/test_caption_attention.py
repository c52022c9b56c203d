"""AttentionWeights output: the bilinear upsampling against hand-computed values, the heat map placed on
the attended cell, the PNG grid, and the JSON per-word summaries against hand-computed values."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from caption_support import save_tiny_checkpoint, shape_image
from sca_caption import attention_maps
from sca_caption.attention_maps import overlay, png_names, render_attention, upsample
from sca_caption.caption import main
from sca_caption.captioning import Caption, attention_summary
from sca_caption.decoding import Hypothesis
from sca_caption.models.sca import AttentionWeights


def one_hot(h: int, w: int, row: int, col: int) -> torch.Tensor:
    alpha = torch.zeros(h, w)
    alpha[row, col] = 1.0
    return alpha


def test_upsample_is_bilinear_between_cell_centres():
    # Output pixel centres of a 1x2 map stretched to width 4 sit at source x = -0.25, 0.25, 0.75,
    # 1.25; clamped to the first and last cell centre: 0, 0.25, 0.75, 1.
    assert upsample(torch.tensor([[0.0, 1.0]]), 1, 4).tolist() == [[0.0, 0.25, 0.75, 1.0]]
    two_by_two = upsample(torch.tensor([[0.0, 1.0], [2.0, 3.0]]), 4, 4)
    assert two_by_two[1, 1].item() == pytest.approx(0.75 * 0.75 * 0 + 0.75 * 0.25 * 1 + 0.25 * 0.75 * 2 + 0.25 * 0.25 * 3)


def test_heat_sits_on_the_attended_cell_and_leaves_far_cells_untouched():
    image = np.full((140, 140, 3), 128, dtype=np.uint8)
    blended = overlay(image, one_hot(7, 7, 1, 5))
    change = np.abs(blended.astype(int) - image.astype(int)).sum(axis=2)
    y, x = np.unravel_index(change.argmax(), change.shape)
    assert (y // 20, x // 20) == (1, 5)  # 140 px / 7 cells = 20 px per cell
    assert change[3 * 20 :, :3 * 20].max() == 0  # cells two or more away get no weight at all
    assert tuple(blended[y, x]) == tuple(
        np.rint(128 * (1 - attention_maps.MAX_OPACITY) + np.array(attention_maps.HEAT_STOPS[-1][1]) * attention_maps.MAX_OPACITY)
    )


def test_png_has_a_row_per_layer_and_a_column_per_word_with_each_words_map():
    m = attention_maps
    words = [f"w{t}" for t in range(m.WORDS_PER_BAND + 3)]  # a full band, then three words in a second
    spatial = [[one_hot(7, 7, t % 7, (2 * t) % 7), one_hot(4, 4, 3 - t % 4, t % 4)] for t in range(len(words))]
    layers = tuple(torch.stack([step[l].flatten() for step in spatial]) for l in range(2))  # (T, m) per layer
    hypothesis = Hypothesis(tokens=[0] * len(words), log_prob=-1.0, score=-1.0, finished=True,
                            attention=AttentionWeights(layers, None))
    caption = Caption(words, hypothesis, grids=((7, 7), (4, 4)))
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    picture = render_attention(image, caption, ["stage6", "stage7"], "title")
    row = m.HEADER_HEIGHT + m.TILE + m.FOOTER_HEIGHT
    assert picture.size == (m.LABEL_WIDTH + (1 + m.WORDS_PER_BAND) * (m.TILE + m.GAP), m.TITLE_HEIGHT + 4 * (row + m.GAP))
    pixels = np.asarray(picture)
    plain = np.asarray(Image.fromarray(m._to_uint8(image)).resize((m.TILE, m.TILE), Image.Resampling.BICUBIC))
    for t in range(len(words)):
        band, column = divmod(t, m.WORDS_PER_BAND)
        left = m.LABEL_WIDTH + (column + 1) * (m.TILE + m.GAP)
        for l in range(2):
            top = m.TITLE_HEIGHT + (2 * band + l) * (row + m.GAP) + m.HEADER_HEIGHT
            assert np.array_equal(pixels[top : top + m.TILE, m.LABEL_WIDTH : m.LABEL_WIDTH + m.TILE], plain)
            tile = pixels[top : top + m.TILE, left : left + m.TILE].astype(int)
            want = overlay(plain, spatial[t][l]).astype(int)
            h, w = spatial[t][l].shape
            row_cell, col_cell = divmod(int(spatial[t][l].argmax()), w)
            outside = np.ones((m.TILE, m.TILE), dtype=bool)  # the outlined peak cell is drawn over
            outside[int(row_cell * m.TILE / h) : math.ceil((row_cell + 1) * m.TILE / h) + 1,
                    int(col_cell * m.TILE / w) : math.ceil((col_cell + 1) * m.TILE / w) + 1] = False
            assert np.array_equal(tile[outside], want[outside]), (l, t)
    last_band_gap = pixels[m.TITLE_HEIGHT + 2 * (row + m.GAP) :, m.LABEL_WIDTH + 4 * (m.TILE + m.GAP) :]
    assert (last_band_gap == 255).all()  # no tiles after the second band's three words


def test_png_names_are_stems_made_unique():
    paths = [Path("a/x.jpg"), Path("b/x.png"), Path("y.gif"), Path("c/x.jpg")]
    assert png_names(paths) == ["x.png", "x-2.png", "y.png", "x-3.png"]


def test_summary_gives_argmax_entropy_and_top_channels():
    alpha = torch.tensor([[0.1, 0.6], [0.3, 0.0]])
    beta = torch.tensor([0.05, 0.5, 0.2, 0.25])
    hypothesis = Hypothesis([4], -1.0, -1.0, True, AttentionWeights((alpha.flatten()[None],), (beta[None],)))
    caption = Caption(["dog"], hypothesis, grids=((2, 2),))
    (word,) = attention_summary(caption, ["stage7"], top_channels=2)
    (layer,) = word["layers"]
    assert word["word"] == "dog" and layer["layer"] == "stage7" and layer["grid"] == [2, 2]
    assert layer["argmax"] == [0, 1] and layer["weight"] == pytest.approx(0.6)
    entropy = -(0.1 * math.log(0.1) + 0.6 * math.log(0.6) + 0.3 * math.log(0.3))
    assert layer["entropy"] == pytest.approx(entropy, abs=1e-6)
    assert layer["top_channels"] == [[1, 0.5], [3, 0.25]]


def test_cli_writes_one_png_per_image(tmp_path, capsys):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny.pt")
    folder = tmp_path / "images"
    folder.mkdir()
    shape_image(folder / "red.png", (220, 30, 30), (10, 10, 40, 40))
    shape_image(folder / "blue.jpg", (40, 80, 230), (50, 50, 90, 90))
    maps = tmp_path / "maps"
    argv = ["--checkpoint", str(checkpoint), "--workers", "0", "--no-progress", "--attention", str(maps), str(folder)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(p.name for p in maps.iterdir()) == ["blue.png", "red.png"]
    for line in lines:
        path, caption = line.split("\t")
        columns = 1 + min(len(caption.split()), attention_maps.WORDS_PER_BAND)
        width, height = Image.open(maps / f"{Path(path).stem}.png").size
        assert width == attention_maps.LABEL_WIDTH + columns * (attention_maps.TILE + attention_maps.GAP)
