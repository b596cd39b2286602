"""The inference worker: an HTTP server over FMSegCore's engines (``fmseg serve``), its client and its launcher.

Only :mod:`~FMSegCore.server.service` and :mod:`~FMSegCore.server.app` import torch; the wire format, the client
and the launcher do not, so Slicer's Python can talk to a worker without ever loading torch.
"""
