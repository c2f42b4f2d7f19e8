"""GIE Studio's notebook surface: a Session over the engine, its display, widgets and plots.

``studio.Session(model)`` is the entry point (studio.session); it renders in JupyterLab through
the extension's MIME renderer (studio.display, studio.schema) and drives the widgets
(studio.widgets) and figures (studio.plots).
"""

from studio.session import RebuildDelta, Session

__all__ = ["RebuildDelta", "Session"]
