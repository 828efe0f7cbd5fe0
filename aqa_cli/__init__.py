"""aqa: end-to-end Action Quality Assessment for sports video.

The package follows the pipeline: ``video`` (decode) → ``clips`` (segment)
→ ``backbones`` (frozen feature extractor) → heads → report. ``cli`` is a thin
Typer layer over these modules; everything it does can be called from Python.
"""

__version__ = "0.1.0"
