"""Digest of a results folder, to show that a change kept every output (``python tools/output_digest.py A [B]``).

Each file gets a digest of its content with what legitimately changes between two runs left out: JSON keys
holding timings, software versions and absolute paths; the zip timestamps inside ``.npz`` (their arrays are hashed
instead); SQLite stores are digested as their ordered rows (annotations, rtree, metadata, other tables). With two
folders it prints the files whose digests differ, and those present in only one, and exits 1 if any differ.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import sys
from pathlib import Path

import numpy as np

VOLATILE = {"timings_s", "timings", "seconds", "software", "wall_s", "started", "machine", "elapsed_s",
            "device_utilisation"}


def _clean(v, root: str):
    if isinstance(v, dict):
        return {k: _clean(x, root) for k, x in v.items() if k not in VOLATILE}
    if isinstance(v, list):
        return [_clean(x, root) for x in v]
    if isinstance(v, str) and root and root in v:
        return v.replace(root, "ROOT")
    return v


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def digest_file(path: Path, root: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".json", ".geojson"):
        try:
            return _sha(json.dumps(_clean(json.loads(path.read_text()), root), sort_keys=True).encode())
        except ValueError:
            pass
    if suffix == ".npz":
        with np.load(path) as z:
            h = hashlib.sha256()
            for k in sorted(z.files):
                a = z[k]
                if k == "meta":
                    a = np.array(json.dumps(_clean(json.loads(str(a)), root), sort_keys=True))
                h.update(k.encode() + str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
            return h.hexdigest()[:16]
    if suffix in (".db", ".partial"):
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        h = hashlib.sha256()
        for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'rtree_%' "
                                    "ORDER BY name"):
            for row in con.execute(f"SELECT * FROM {table} ORDER BY 1"):
                if table == "metadata":
                    row = (row[0], json.dumps(_clean(json.loads(row[1]), root), sort_keys=True))
                h.update(repr(row).encode())
        con.close()
        return h.hexdigest()[:16]
    return _sha(path.read_bytes())


def digest(folder: Path) -> dict[str, str]:
    folder = Path(folder)
    root = str(folder.resolve())
    return {str(p.relative_to(folder)): digest_file(p, root) for p in sorted(folder.rglob("*")) if p.is_file()}


def main(argv: list[str]) -> int:
    a = digest(Path(argv[0]))
    if len(argv) == 1:
        for k, v in a.items():
            print(f"{v}  {k}")
        return 0
    b = digest(Path(argv[1]))
    differ = [k for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]
    for k in differ:
        print(f"differs: {k}")
    for k in sorted(a.keys() - b.keys()):
        print(f"only in {argv[0]}: {k}")
    for k in sorted(b.keys() - a.keys()):
        print(f"only in {argv[1]}: {k}")
    print(f"{len(a.keys() & b.keys()) - len(differ)} identical, {len(differ)} differ, "
          f"{len(a.keys() ^ b.keys())} in one folder only")
    return 1 if differ or a.keys() ^ b.keys() else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
