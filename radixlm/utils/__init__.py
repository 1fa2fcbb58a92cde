"""Small helpers shared by several layers of the engine; nothing here imports another radixlm package."""
