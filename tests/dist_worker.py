"""Run by tests/test_distributed.py under torchrun: a training run in which one rank fails on purpose.

    python -m torch.distributed.run --nproc-per-node 2 tests/dist_worker.py CONFIG.json MODE

MODE "die": rank 1 exits abruptly after step 2; "hang": rank 1 stops answering after step 2.
"""

import json
import os
import sys
import time

from qlora_kit.cli import main  # noqa: F401  (the same imports as the CLI)
from qlora_kit.config import TrainConfig
from qlora_kit.distributed import RankFailure
from qlora_kit.train import train


def on_step(step, model):
    if step == 2 and os.environ["RANK"] == "1":
        if sys.argv[2] == "die":
            os._exit(17)
        time.sleep(3600)


if __name__ == "__main__":
    cfg = TrainConfig(**json.loads(open(sys.argv[1]).read()))
    try:
        train(cfg, progress=False, _on_step=on_step)
    except RankFailure as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
