"""`img2vec <command>`: the tools around the two stages. Each command lives in the module that owns
its work and is imported only when called, so `img2vec --help` is instant and no stage imports
another through here."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("train.demo", "the whole chain on generated shards, on a laptop CPU, in minutes"),
    "diversity": ("common.diversity", "token diversity of a cache or of teachers over shards, + similarity maps"),
    "verify": ("shards.verify", "check a cache: records, checksums, and recompute views with the teacher"),
    "export": ("train.export", "student checkpoint -> timm ViT encoder weights (safetensors)"),
    "make-shards": ("shards.make", "an image folder (ImageNet layout) -> WebDataset shards"),
    "knn": ("train.knn", "k-nearest-neighbour probe of an encoder on labelled shards"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "usage: img2vec <command> [--help] ...\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"img2vec: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest, prog=f"img2vec {name}") or 0


if __name__ == "__main__":
    raise SystemExit(main())
