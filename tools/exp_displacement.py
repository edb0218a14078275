"""How much of the attack's weight displacement is about the subject? (issue 7 diagnostic, session 5)

Attacks three faces of the default catalog with the white-box DreamBooth defaults (seed 0) and the first
face again with seed 1, and prints each displacement's norm relative to the weights and the pairwise
cosines at 50, 200 and 400 steps. Same face / other seed vs other face / other seed separates the
subject's coherent direction from the direction shared by every DreamBooth run and from minibatch noise.

    OMP_NUM_THREADS=1 python -m tools.exp_displacement
"""
import torch

from tools.attack import AttackSettings, attack
from tools.evaluate import default_catalog
from train.catalog import load_catalog, load_images
from train.pipelines import load_pipeline


def flat(unet) -> torch.Tensor:
    return torch.cat([q.detach().flatten() for q in unet.parameters()])


def main() -> None:
    torch.set_num_threads(1)
    pipe = load_pipeline("tiny-sd")
    base = flat(pipe.unet)
    faces = [e for e in load_catalog(default_catalog()) if e.cls == "person"][:3]
    runs = {(e.id, seed): e for e, seed in [(f, 0) for f in faces] + [(faces[0], 1)]}
    disp = {}
    for (eid, seed), e in runs.items():
        snaps = disp.setdefault((eid, seed), {})

        def keep(step, attacked, snaps=snaps):
            if step in (50, 200, 400):
                snaps[step] = flat(attacked.unet) - base
        attack(pipe, load_images(e.images, 64), e.cls, AttackSettings(steps=400, seed=seed), on_step=keep)
    keys = list(disp)
    for step in (50, 200, 400):
        print(f"step {step}: |delta| / |theta| =", ", ".join(f"{k[0][-4:]}/s{k[1]} {disp[k][step].norm() / base.norm():.3f}"
                                                          for k in keys))
        for i, a in enumerate(keys):
            for b in keys[i + 1:]:
                x, y = disp[a][step], disp[b][step]
                print(f"  cos {a[0][-4:]}/s{a[1]} vs {b[0][-4:]}/s{b[1]}: {float(x @ y / x.norm() / y.norm()):.3f}")


if __name__ == "__main__":
    main()
