"""`lazymerge inspect`: describe a checkpoint from its (validated) headers."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from lazymerge.io.hub_cache import resolve_input
from lazymerge.io.reader import Checkpoint
from lazymerge.progress import format_bytes


def inspect_checkpoint(path: Path, as_json: bool = False) -> str:
    """Validate every header of `path` (a path, or a Hugging Face model id found in the local
    cache) and describe its tensors and shard layout."""
    source = resolve_input(path)
    with Checkpoint.open(source.path) as ckpt:
        infos = list(ckpt.values())
        files = ckpt.files
    parameters = sum(i.numel for i in infos)
    nbytes = sum(i.nbytes for i in infos)
    dtypes = Counter(i.dtype for i in infos)
    if as_json:
        return json.dumps(
            {
                "path": str(path),
                "source": source.to_dict(),
                "files": [
                    {
                        "name": f.name,
                        "tensors": sum(1 for i in infos if i.path == f),
                        "bytes": f.stat().st_size,
                    }
                    for f in files
                ],
                "tensors": [
                    {"name": i.name, "dtype": i.dtype, "shape": list(i.shape), "file": i.path.name}
                    for i in infos
                ],
                "parameters": parameters,
                "bytes": nbytes,
                "dtypes": dict(dtypes),
            },
            indent=2,
        )
    lines = [f"read {source.describe()}"] if source.from_hub_cache else []
    for f in files:
        lines.append(f"{f.name}: {format_bytes(f.stat().st_size)}")
        for i in (i for i in infos if i.path == f):
            lines.append(f"  {i.name:60s} {i.dtype:8s} {list(i.shape)}")
    lines.append(
        f"{len(infos)} tensors in {len(files)} file(s), {parameters:,} parameters, {format_bytes(nbytes)} "
        f"of tensor data ({', '.join(f'{d}: {n}' for d, n in sorted(dtypes.items()))}); headers valid"
    )
    return "\n".join(lines)
