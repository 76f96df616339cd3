"""Worker process: base model, adapter cache, batching engine, internal API.

Importing this package does not import torch; `worker.protocol` is shared with the gateway.
"""
