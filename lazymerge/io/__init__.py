"""File formats: safetensors headers, lazy readers and streaming writers. Knows nothing of merging."""
