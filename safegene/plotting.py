"""Figures without pyplot: a matplotlib figure on its own Agg canvas, so the process's global backend (a
notebook's, a GUI's) stays as the caller set it. Used by the layer-score plot and the reports."""

from __future__ import annotations

from typing import Any


def figure(**kw: Any) -> Any:
    """A matplotlib Figure drawn by the Agg canvas. Raises ImportError without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig
