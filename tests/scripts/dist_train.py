"""Run by tests/test_distributed.py under `mlx.launch -n 2`: LoRA-train the tiny model on the
test pairs; rank 0 writes the losses beside the adapter. Usage: dist_train.py MODEL OUT."""

import json
import sys
from pathlib import Path

from tracer import backend

backend.setup()

from tracer import model as models  # noqa: E402
from tracer import distributed, train  # noqa: E402
from tracer.config import LoraConfig, TrainConfig  # noqa: E402

PAIRS = [(f"Follow E{i} -r{i % 3}-> ?", f"TRACE: E{i} -r{i % 3}-> E{(i * 7 + 3) % 12}\nANSWER: A") for i in range(12)]
CFG = TrainConfig(iters=6, batch_size=8, learning_rate=1e-3, warmup=1, save_every=3, val_every=0, seed=3)
LORA = LoraConfig(rank=4, alpha=8.0)


def main(model_dir: str, out: str) -> None:
    model, tok = models.load(model_dir)
    stats = train.train(model, tok, PAIRS, CFG, LORA, out, models.model_id(model_dir))
    rank, size = distributed.world()
    if rank == 0:
        (Path(out) / "losses.json").write_text(json.dumps({"losses": stats["losses"], "size": size}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
