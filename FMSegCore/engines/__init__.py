"""Engines: promptable (SAM-style), in-context and adaptation. They talk to models through small interfaces."""
