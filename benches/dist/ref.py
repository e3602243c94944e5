# The Python side of `make bench-dist`: torch.distributed's all_reduce on Gloo, timed as
# benches/dist/main.rs times tch_detloss::dist (same sizes, warm-up, iterations and barrier).
# Run by the bench under torchrun; rank 0 prints one line "DIST_BENCH <json>".
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sizes = [int(s) for s in sys.argv[1].split(",")]
iters = [int(s) for s in sys.argv[2].split(",")]
torch.set_num_threads(1)
dist.init_process_group("gloo")
rows = []
for nbytes, n in zip(sizes, iters):
    x = torch.zeros(max(1, nbytes // 4), dtype=torch.float32)
    for _ in range(3):
        dist.all_reduce(x)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(n):
        dist.all_reduce(x)
    dt = (time.perf_counter() - t0) / n
    assert x[0].item() == 0.0
    rows.append({"bytes": x.numel() * 4, "iters": n, "seconds": dt})
if dist.get_rank() == 0:
    print("DIST_BENCH " + json.dumps({"impl": "torch.distributed (Python)", "world": dist.get_world_size(), "rows": rows}), flush=True)
dist.destroy_process_group()
