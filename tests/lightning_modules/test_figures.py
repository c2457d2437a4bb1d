"""`lightning_modules.figures.image_grid`: the one grid drawer of the callback, evaluate and preview."""

from __future__ import annotations

import numpy as np

from lightning_modules.figures import Panel, image_grid


def test_grid_places_panels_titles_labels_and_empty_cells() -> None:
    img = np.arange(12.0).reshape(3, 4)
    cells = [[Panel(img, title="a"), Panel(img, "magma", vmax=5.0, title="b")], [None, Panel(img)]]
    fig = image_grid(cells, ["row 1", "row 2"], cell_size=(1.0, 1.5))
    axes = np.array(fig.axes).reshape(2, 2)
    assert tuple(fig.get_size_inches()) == (2.0, 3.0)
    assert [ax.get_title() for ax in axes[0]] == ["a", "b"] and axes[1, 1].get_title() == ""
    assert [axes[0, 0].get_ylabel(), axes[1, 0].get_ylabel()] == ["row 1", "row 2"]
    assert not axes[1, 0].axison and len(axes[1, 0].images) == 0  # the empty cell
    shown = axes[0, 1].images[0]
    assert shown.get_cmap().name == "magma" and shown.get_clim() == (0.0, 5.0)
    assert axes[0, 0].images[0].get_clim() == (0.0, 11.0)  # vmax None: the image's own maximum
    assert all(ax.get_xticks().size == 0 and ax.get_yticks().size == 0 for ax in axes.flat)
