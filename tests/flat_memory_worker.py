"""Many short epochs of one backend in a fresh process, as a training job runs them (no
malloc_trim, no collection forced): prints JSON of the resident memory (MB) and the thread count
after each epoch (tests/test_faults.py; scripts/gpu_check.sh passes a device).

    python tests/flat_memory_worker.py DATASET BACKEND EPOCHS [DEVICE]"""
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np

from fastload import FastLoader

path, backend, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
device = sys.argv[4] if len(sys.argv) > 4 else "cpu"
loader = FastLoader(path, "validation", batch_size=16, num_workers=2, backend=backend, spec="imagenet:train", seed=0,
                    indices=np.arange(32), device=device)
page = os.sysconf("SC_PAGE_SIZE")
rss, threads = [], []
for epoch in range(epochs):
    loader.set_epoch(epoch)
    for _ in loader:
        pass
    rss.append(int(Path("/proc/self/statm").read_text().split()[1]) * page / 2**20)
    threads.append(threading.active_count() + len(os.listdir("/proc/self/task")))
print(json.dumps({"rss": rss, "threads": threads}))
