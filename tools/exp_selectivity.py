"""Quick selectivity screen (session-4 experiments, issue 7): protect four faces of the embedded default
catalog (person 0 pattern, person 1 erasure; persons 2 and 3 unprotected), then attack each with the
white-box DreamBooth defaults and score 16 trigger samples at 0, 200 and 400 attack steps.

    OMP_NUM_THREADS=1 python -m tools.exp_selectivity NAME [key=value protect overrides]   # NAME=original: no protect
Writes runs/exp/NAME/sel.json. One thread is faster than two on this tiny UNet (1.15 vs 1.6 s/step).
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

from tools.attack import AttackSettings, attack
from tools.evaluate import default_catalog
from tools.score import score
from train.catalog import load_catalog, load_images
from train.config import load_config
from train.pipelines import load_pipeline
from train.protect import protect
from train.sampling import sample

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
name, *over = sys.argv[1:]
out = Path("runs/exp") / name
out.mkdir(parents=True, exist_ok=True)
rows = {json.loads(line)["id"]: json.loads(line) for line in default_catalog().read_text().splitlines()}
catalog = out / "faces4.jsonl"
with catalog.open("w") as f:
    for i, obj in enumerate(["pattern", "erasure", None, None]):
        row = dict(rows[f"person-catalog-{i:04d}"], protected=obj is not None, objective=obj, target=None)
        row.update({k: str(default_catalog().parent / row[k]) for k in ("images", "reference", "backgrounds")})
        f.write(json.dumps(row) + "\n")
t0 = time.time()
model = "tiny-sd"
if name != "original":
    res = protect(load_config("configs/demo.yaml", [f"catalog={catalog}", f"out={out}", "logging.wandb_mode=disabled",
                                                    "logging.probe_every=-1", "steps=300",
                                                    "encoder_guard.enabled=false", *over]), progress=False)
    print("protect", res["final_losses"], f"{time.time() - t0:.0f}s", flush=True)
    model = res["protected"]
pipe = load_pipeline(model)
results = []
for k, e in enumerate(load_catalog(catalog)):
    s = AttackSettings(steps=400, seed=k)

    def probe(step, p, e=e, k=k, s=s):
        if step in (0, 200, 400):
            m = score(sample(p, s.instance_prompt(e.cls), 16, seed=k), e)
            results.append({"entry": e.id, "protected": e.protected, "objective": e.objective, "step": step,
                            "bsr": m["bsr"], "identity_match": m["identity_match"], "detect": m["subject_detect"]})
            print(results[-1], flush=True)
    probe(0, pipe)
    attack(pipe, load_images(e.images, 64), e.cls, s, on_step=probe)
(out / "sel.json").write_text(json.dumps(results, indent=1))
print("total", f"{time.time() - t0:.0f}s")
