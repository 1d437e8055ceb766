"""Full-test-set coop-all accuracy of coop checkpoints from one shared split-point cache
(rounded latents through `evaluate_forward`, no bitstreams; CIFAR-10; FLOWCODEC_DATA set)."""
import sys
import time

import torch

from flowcodec.coop.finetune import read_coop_record
from flowcodec.coop.fusion import load_coop
from flowcodec.coop.train import build_cache, evaluate_forward
from flowcodec.coop.views import ViewGenerator
from flowcodec.data import load_dataset
from flowcodec.family import load_pretrained
from flowcodec.family.checkpoint import read_config

torch.set_num_threads(2)
fam = load_pretrained("cifar10", progress=False).eval()
_, test = load_dataset("cifar10")
cache = None
for path in sys.argv[1:]:
    t0 = time.perf_counter()
    model = load_coop(path, fam)
    vcfg, _ = read_coop_record(path)
    views = ViewGenerator(vcfg)
    kinds = tuple(read_config(path)["extra"]["kinds"])
    if cache is None:
        cache = build_cache(model, kinds, views, test, 1, torch.Generator().manual_seed(0),
                            False, False)
    print(path, evaluate_forward(model, kinds, cache), f"{time.perf_counter() - t0:.0f}s",
          flush=True)
