"""Loading diffusers pipelines by name: `tiny-sd` and `tiny-sdxl` are the committed embedded models,
any other name is a path to a diffusers folder (SD 1.x/2.x or SDXL; the class comes from model_index.json).
"""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = {"tiny-sd": REPO / "models" / "tiny-sd", "tiny-sdxl": REPO / "models" / "tiny-sdxl"}


def resolve_model(name: str | Path) -> Path:
    path = EMBEDDED.get(str(name), Path(name))
    if not (path / "model_index.json").is_file():
        known = ", ".join(EMBEDDED)
        raise FileNotFoundError(f"{path}: not a diffusers pipeline folder (no model_index.json); "
                                f"--model takes {known} or a path")
    return path


def quiet_libraries() -> None:
    """Keep our own progress bars readable: no per-component loading bars or dtype chatter."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_pipeline(name: str | Path):
    from diffusers import DiffusionPipeline

    quiet_libraries()
    pipe = DiffusionPipeline.from_pretrained(resolve_model(name))
    pipe.set_progress_bar_config(disable=True)
    for m in pipe.components.values():
        if hasattr(m, "requires_grad_"):
            m.requires_grad_(False)
            m.eval()
    return pipe
