"""``python -m pipeline.train`` with the rigged loss terms of ``tests/rigged.py`` registered: what a test
starts under torchrun (``python -m torch.distributed.run ... tests/rigged_train.py <train arguments>``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/: rigged
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository: components, pipeline

import rigged  # noqa: E402, F401  (registers the rigged terms with gin)

from pipeline.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
