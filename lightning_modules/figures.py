"""One way to draw a grid of images (the validation callback's panel, `lfmri evaluate`'s figure.png and
`lfmri preview`'s PNG): a matplotlib `Figure` without pyplot, so a caller's plotting backend is left alone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure


@dataclass(frozen=True)
class Panel:
    """One image of the grid: a 2D array, its colour map and range (None: the image's own), a title."""

    image: np.ndarray
    cmap: str = "gray"
    vmin: float | None = 0.0
    vmax: float | None = None
    title: str = ""


def image_grid(cells: Sequence[Sequence[Panel | None]], row_labels: Sequence[str] = (),
               cell_size: tuple[float, float] = (2.2, 2.3), fontsize: float = 9) -> Figure:
    """A figure of `cells` (rows of panels; None leaves a cell empty) with `row_labels` on the left of each
    row, no ticks; `cell_size` (width, height) in inches per cell. Laid out tightly: save or draw it."""
    n_rows, n_cols = len(cells), max((len(row) for row in cells), default=0)
    fig = Figure(figsize=(cell_size[0] * n_cols, cell_size[1] * n_rows))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, row in enumerate(cells):
        for c in range(n_cols):
            ax, panel = axes[r, c], row[c] if c < len(row) else None
            ax.set_xticks([])
            ax.set_yticks([])
            if panel is None:
                ax.axis("off")
                continue
            ax.imshow(panel.image, cmap=panel.cmap, vmin=panel.vmin, vmax=panel.vmax)
            if panel.title:
                ax.set_title(panel.title, fontsize=fontsize)
        if r < len(row_labels):
            axes[r, 0].set_ylabel(row_labels[r], fontsize=fontsize)
    fig.tight_layout()
    return fig
