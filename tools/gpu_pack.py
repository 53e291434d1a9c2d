"""Pack files into parts that each fit one transfer, and put them back together.

A machine borrowed for a GPU check takes a limited number of bytes per call (64
MiB, with the repository itself), and MLX's CUDA wheel alone is larger, so
``tools/gpu_check.sh`` sends the prepared wheels as a few parts, one per call.
This module cuts them into pieces, fills the parts in order, and writes a
manifest (sizes and SHA-256 of every piece and every whole file) into each
part; ``unpack`` checks every piece against it and refuses with the name of
what is missing or damaged, so an incomplete transfer never installs.

    python tools/gpu_pack.py pack --limit-mib 60 --source-root . --out DIR FILE...
    python tools/gpu_pack.py verify DIR/a DIR/b
    python tools/gpu_pack.py check-source --root . DIR/b
    python tools/gpu_pack.py unpack --out WHEELS SOURCE_DIR...

A packing also records the digest of the sources its wheel was built from;
``check-source`` refuses parts built from other sources than the checkout's
(a stale wheel would spend the borrowed minutes checking old kernels).

Standard library only: it runs on the GPU machine before anything is
installed there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import string
import sys
from pathlib import Path

MANIFEST = "manifest.json"
MIB = 1 << 20
# What one transfer may carry besides the repository's own files (64 MiB
# per call in all; the repository takes under 2 MiB).
DEFAULT_LIMIT_MIB = 60


# What this package's wheel is built from (folders walked, __pycache__ left
# out).
SOURCE_PATHS = (
    "CMakeLists.txt",
    "pyproject.toml",
    "cmake",
    "csrc",
    "kernels",
    "python/mlx_fused_sgd",
)


class PackError(Exception):
    """A part or piece is missing, oversized, damaged or stale."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def source_digest(root: Path) -> str:
    """SHA-256 over the names and contents of the sources under ``root``
    that the wheel is built from."""
    digest = hashlib.sha256()
    for top in SOURCE_PATHS:
        base = root / top
        if base.is_file():
            found = [base]
        else:
            found = sorted(
                p
                for p in base.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts
            )
        for path in found:
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(_sha256(path).encode())
    return digest.hexdigest()


def pack(files: list[Path], out: Path, limit: int, source: str | None = None) -> dict:
    """Cut ``files`` into pieces and fill parts ``out/a``, ``out/b``, ...,
    each holding at most ``limit`` bytes (its manifest included), recording
    ``source`` (a :func:`source_digest`). Returns the manifest."""
    room = 64 * 1024  # for the manifest, in each part
    if limit <= room:
        raise PackError(f"limit must leave room for the manifest: {limit} bytes")
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise PackError(f"two files share a name: {sorted(names)}")
    if out.exists():
        shutil.rmtree(out)
    budget = limit - room
    parts = [string.ascii_lowercase[0]]
    used = 0
    entries = []
    for path in files:
        entry = {"name": path.name, "size": path.stat().st_size}
        entry["sha256"] = _sha256(path)
        entry["pieces"] = []
        with path.open("rb") as f:
            while True:
                if used >= budget:
                    if len(parts) == len(string.ascii_lowercase):
                        raise PackError("over 26 parts: raise the limit")
                    parts.append(string.ascii_lowercase[len(parts)])
                    used = 0
                data = f.read(budget - used)
                piece = {
                    "file": f"{path.name}.{len(entry['pieces']):03d}",
                    "part": parts[-1],
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
                (out / piece["part"]).mkdir(parents=True, exist_ok=True)
                (out / piece["part"] / piece["file"]).write_bytes(data)
                entry["pieces"].append(piece)
                used += len(data)
                if f.tell() >= entry["size"]:
                    break
        entries.append(entry)
    manifest = {"limit": limit, "parts": parts, "files": entries, "source": source}
    for part in parts:
        (out / part / MANIFEST).write_text(json.dumps(manifest, indent=1))
    verify([out / p for p in parts], limit=limit)
    return manifest


def _manifest(sources: list[Path]) -> dict:
    found = [s / MANIFEST for s in sources if (s / MANIFEST).exists()]
    if not found:
        raise PackError(f"no {MANIFEST} in {', '.join(map(str, sources))}")
    manifests = {f.read_text() for f in found}
    if len(manifests) != 1:
        raise PackError(
            "the parts come from different packings: "
            + ", ".join(str(f) for f in found)
            + " (prepare again, and send every part of one packing)"
        )
    return json.loads(manifests.pop())


def _find_piece(piece: dict, sources: list[Path]) -> Path:
    for source in sources:
        path = source / piece["file"]
        if path.exists():
            return path
    raise PackError(
        f"piece {piece['file']} (part {piece['part']}) is missing from "
        f"{', '.join(map(str, sources))}: was part {piece['part']} sent?"
    )


def verify(sources: list[Path], limit: int | None = None) -> dict:
    """Check that ``sources`` hold every piece of one packing, each with its
    size and SHA-256; with ``limit``, that each part folder is within it."""
    manifest = _manifest(sources)
    for entry in manifest["files"]:
        for piece in entry["pieces"]:
            path = _find_piece(piece, sources)
            if path.stat().st_size != piece["size"]:
                raise PackError(
                    f"{path}: {path.stat().st_size} bytes, the manifest says "
                    f"{piece['size']}"
                )
            if _sha256(path) != piece["sha256"]:
                raise PackError(f"{path}: damaged (its SHA-256 differs)")
    if limit is not None:
        for source in sources:
            total = sum(p.stat().st_size for p in source.iterdir() if p.is_file())
            if total > limit:
                raise PackError(
                    f"{source}: {total / MIB:.1f} MiB, over the {limit / MIB:.1f} "
                    "MiB one transfer carries"
                )
    return manifest


def check_source(sources: list[Path], root: Path) -> None:
    """Refuse parts whose wheel was built from other sources than those
    under ``root``."""
    recorded = _manifest(sources).get("source")
    if recorded is None:
        raise PackError(
            "the parts record no source digest: prepare again "
            "(tools/gpu_check.sh prepare)"
        )
    if recorded != source_digest(root):
        raise PackError(
            f"the parts were built from other sources than those in {root} "
            f"({', '.join(SOURCE_PATHS)}): prepare again "
            "(tools/gpu_check.sh prepare) and send the new parts"
        )


def unpack(sources: list[Path], out: Path) -> list[Path]:
    """Put every file back together in ``out``; each is checked whole."""
    manifest = verify(sources)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for entry in manifest["files"]:
        path = out / entry["name"]
        with path.open("wb") as f:
            for piece in entry["pieces"]:
                f.write(_find_piece(piece, sources).read_bytes())
        if path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
            raise PackError(f"{path}: put back together, but its SHA-256 differs")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="cut files into parts of at most --limit-mib")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--limit-mib", type=float, default=DEFAULT_LIMIT_MIB)
    p.add_argument(
        "--source-root", type=Path, help="record the digest of this checkout"
    )
    c = sub.add_parser("check-source", help="refuse parts built from other sources")
    c.add_argument("sources", nargs="+", type=Path)
    c.add_argument("--root", type=Path, required=True)
    v = sub.add_parser("verify", help="check the parts against their manifest")
    v.add_argument("sources", nargs="+", type=Path)
    v.add_argument("--limit-mib", type=float, default=None)
    u = sub.add_parser("unpack", help="put the files back together")
    u.add_argument("sources", nargs="+", type=Path)
    u.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "pack":
            source = (
                None if args.source_root is None else source_digest(args.source_root)
            )
            manifest = pack(args.files, args.out, int(args.limit_mib * MIB), source)
            for part in manifest["parts"]:
                folder = args.out / part
                size = sum(f.stat().st_size for f in folder.iterdir())
                print(f"{folder}: {size / MIB:.1f} MiB")
        elif args.command == "verify":
            limit = None if args.limit_mib is None else int(args.limit_mib * MIB)
            manifest = verify(args.sources, limit)
            print(f"complete: {len(manifest['files'])} files")
        elif args.command == "check-source":
            check_source(args.sources, args.root)
            print(f"built from the sources in {args.root}")
        else:
            for path in unpack(args.sources, args.out):
                print(path)
    except PackError as e:
        print(f"gpu_pack: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
