"""Rendering: EOB templates (text + HTML, per language) and MIME assembly."""

from eobblast.render.mime import RenderedMessage, Renderer

__all__ = ["RenderedMessage", "Renderer"]
