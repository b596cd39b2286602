"""The inference worker: an HTTP server over FMSegCore's engines (``fmseg serve``), its client and its launcher.

The HTTP front (:mod:`~FMSegCore.server.app`, :mod:`~FMSegCore.server.routes`, FastAPI) and the service import
torch; the wire format, the client and the launcher import neither torch nor FastAPI, so Slicer's Python can talk
to a worker without ever loading them.
"""
