"""Developer tools that are not part of the runtime path (the compile check without a GPU)."""
