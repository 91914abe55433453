"""`accelerate launch -m train ...`, `accelerate launch train ...` (from the repo root), `python -m train ...`."""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a directory (`accelerate launch train`): import the package, not files
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from train.loop import main  # noqa: E402

raise SystemExit(main())
