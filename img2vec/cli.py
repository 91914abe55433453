"""`img2vec <command>`: the tools around the two stages, the top of the house. Each command is one
module of this package, imported only when called, so `img2vec --help` is instant. Tools import the
stages (common, shards, extract, train); nothing below imports this package."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("img2vec.demo", "the whole chain on generated shards, on a laptop CPU, in minutes"),
    "diversity": ("img2vec.diversity", "token diversity of a cache or of teachers over shards, + similarity maps"),
    "verify": ("img2vec.verify", "check a cache: records, checksums, and recompute views with the teacher"),
    "export": ("img2vec.export", "student checkpoint -> timm ViT encoder weights (safetensors)"),
    "make-shards": ("img2vec.make_shards", "an image folder (ImageNet layout) -> WebDataset shards"),
    "knn": ("img2vec.knn", "k-nearest-neighbour probe of an encoder on labelled shards"),
    "linprobe": ("img2vec.linprobe", "MAE's linear probe of a trained student on labelled shards"),
    "finetune": ("img2vec.finetune", "MAE's end-to-end fine-tuning of a trained student on labelled shards"),
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
