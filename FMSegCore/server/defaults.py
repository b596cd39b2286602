"""The worker's resource defaults, torch-free so ``fmseg serve --help`` and clients can read them."""

#: A prompt session unused this long is dropped (its embedding cache with it).
SESSION_IDLE_S = 30 * 60.0
#: The memory all prompt sessions' image embeddings share (on the worker's device); beyond it the least
#: recently used embedding of any session goes (and is encoded again if needed).
EMBEDDING_BUDGET = 4 << 30
