"""FMSegCore: medical segmentation foundation models (promptable, in-context, adapted) without Slicer.

Nothing in this package imports ``slicer``, ``qt``, ``vtk`` or ``ctk``: it runs in plain Python, in a
worker process, or inside Slicer's Python alike.
"""

__version__ = "0.1.0"
