"""Round-trip screen of an encoder guard (session 22, issue 5): per catalog entry, the share of its photos
whose decode(guarded encode(photo)) the judge still matches to the entry's references. Seconds instead
of an evaluation's 40 minutes, so a run's partial checkpoints can be compared before one is released.

What it does and does not predict (docs/journal.md "Session 22"): a protected face that still round-trips is one
the attack learns (session 21's two leaking faces were the two highest here); an unprotected face that
round-trips can still be personalized worse than on the original (person-0088 did), so the attack
evaluation stays the judge of fidelity.

    python -m tools.exp_roundtrip CATALOG GUARD [GUARD ...] [--out FILE.json]

GUARD: a protect run's out (its protected/vae) or an encoder-guard checkpoint (.pt).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from tools.score import evaluators
from train.catalog import load_catalog, load_images
from train.pipelines import resolve_model


def load_guard(source: Path) -> tuple[AutoencoderKL, float | None]:
    """The guarded VAE and the guard seconds it took (known for checkpoints only)."""
    if source.suffix == ".pt":
        state = torch.load(source, weights_only=False)
        if "guard" not in state:
            raise ValueError(f"{source}: not an encoder-guard checkpoint (no 'guard' state)")
        vae = AutoencoderKL.from_pretrained(resolve_model("tiny-sd") / "vae")
        vae.load_state_dict(state["guard"]["vae"])
        return vae.eval(), state["guard"].get("seconds")
    if not (source / "protected" / "vae").is_dir():
        raise FileNotFoundError(f"{source}: neither a .pt checkpoint nor a protect run (no protected/vae)")
    return AutoencoderKL.from_pretrained(source / "protected" / "vae").eval(), None


@torch.no_grad()
def screen(catalog: Path, guard: AutoencoderKL) -> dict:
    judge = evaluators()
    rows = {}
    for e in load_catalog(catalog):
        photos = load_images(e.images, 64)
        back = (guard.decode(guard.encode(photos * 2 - 1).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
        match = (judge.ism(back, load_images(e.reference, 64)) > judge.threshold).float().mean().item()
        rows[e.id] = {"protected": e.protected, "match": match}
    summary = {}
    for side, protected in (("protected", True), ("unprotected", False)):
        side_rows = {k: r["match"] for k, r in rows.items() if r["protected"] == protected}
        if side_rows:
            order = sorted(side_rows, key=side_rows.get, reverse=protected)   # leaks first / damage first
            summary[side] = {"match": sum(side_rows.values()) / len(side_rows),
                             "worst": {k: side_rows[k] for k in order[:4]}}
    return {"summary": summary, "entries": rows}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("catalog", type=Path)
    p.add_argument("guards", type=Path, nargs="+")
    p.add_argument("--out", type=Path, help="write every guard's screen to this JSON file")
    a = p.parse_args(argv)
    results = {}
    for source in a.guards:
        vae, seconds = load_guard(source)
        results[str(source)] = {"seconds": seconds, **screen(a.catalog, vae)}
        sides = " | ".join(f"{side} matched {r['match']:.3f} (worst: {r['worst']})"
                           for side, r in results[str(source)]["summary"].items())
        print(f"{source}: guard {seconds or float('nan'):.0f} s | {sides}", flush=True)
    if a.out:
        a.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
