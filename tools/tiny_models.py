"""Builders of the tiny SD-1.x- and SDXL-shaped diffusers pipelines, from configs, with no downloads.

The tokenizer is a CLIP byte-level BPE trained locally (transformers' `train_new_from_iterator` on the
world's captions); every byte keeps a base token, so arbitrary text, rare identifiers like "sks"
included, tokenizes without unknowns. transformers 5 saves only tokenizer.json, so `save_tokenizer`
also writes the classic vocab.json + merges.txt that older loaders expect.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def build_tokenizer(corpus: list[str], vocab_size: int, model_max_length: int) -> CLIPTokenizer:
    base = sorted(pre_tokenizers.ByteLevel.alphabet())
    seed_vocab = {t: i for i, t in enumerate(base + [b + "</w>" for b in base] + [BOS, EOS])}
    trained = CLIPTokenizer(vocab=seed_vocab, merges=[]).train_new_from_iterator(corpus, vocab_size=vocab_size)
    model = json.loads(trained.backend_tokenizer.to_str())["model"]
    vocab, merges = dict(model["vocab"]), [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    for tok in base + [b + "</w>" for b in base] + [BOS, EOS]:  # the trainer drops unused base tokens
        vocab.setdefault(tok, len(vocab))
    vocab = {t: i for i, t in enumerate([t for t in sorted(vocab, key=vocab.get) if t not in (BOS, EOS)] + [BOS, EOS])}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def save_tokenizer(tok: CLIPTokenizer, folder: Path) -> None:
    folder = Path(folder)
    tok.save_pretrained(folder)
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_max_length"] = tok.model_max_length
    cfg_path.write_text(json.dumps(cfg, indent=1))


def _text_config(tok: CLIPTokenizer, **arch) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tok), max_position_embeddings=tok.model_max_length,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, **arch)


def build_vae(cfg: dict):
    from diffusers import AutoencoderKL

    n = len(cfg["block_out_channels"])
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg["block_out_channels"]),
                         layers_per_block=1, latent_channels=cfg["latent_channels"],
                         norm_num_groups=cfg["norm_num_groups"],
                         sample_size=64)


def _unet(cfg: dict, sample_size: int, cross_dim: int, **extra):
    from diffusers import UNet2DConditionModel

    boc = tuple(cfg["block_out_channels"])
    n = len(boc)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=boc,
        layers_per_block=cfg["layers_per_block"], attention_head_dim=cfg["attention_head_dim"],
        norm_num_groups=cfg["norm_num_groups"],
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",), cross_attention_dim=cross_dim, **extra)


def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, prediction_type="epsilon", clip_sample=False)


def build_sd(cfg: dict, tok: CLIPTokenizer, vae, latent_size: int):
    from diffusers import StableDiffusionPipeline

    te = CLIPTextModel(_text_config(tok, **cfg["text_encoder"]))
    unet = _unet(cfg["unet"], latent_size, te.config.hidden_size)
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_sdxl(cfg: dict, tok: CLIPTokenizer, vae, latent_size: int):
    from diffusers import StableDiffusionXLPipeline

    te = CLIPTextModel(_text_config(tok, **cfg["text_encoder"]))
    te2 = CLIPTextModelWithProjection(_text_config(tok, **cfg["text_encoder_2"]))
    ucfg = dict(cfg["unet"])
    time_dim = ucfg.pop("addition_time_embed_dim")
    unet = _unet(ucfg, latent_size, te.config.hidden_size + te2.config.hidden_size,
                 addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                 projection_class_embeddings_input_dim=te2.config.projection_dim + 6 * time_dim)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=scheduler(), force_zeros_for_empty_prompt=False)


def save_pipeline(pipe, folder: Path) -> None:
    """save_pretrained, plus the BPE files in every tokenizer folder; a component loaded from a folder
    (`persguard pretrain --vae`) does not carry that folder's path into the saved config."""
    folder = Path(folder)
    pipe.save_pretrained(folder)
    for cfg_path in folder.glob("*/config.json"):
        cfg = json.loads(cfg_path.read_text())
        if cfg.pop("_name_or_path", None) is not None:
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(pipe, name, None) is not None:
            save_tokenizer(getattr(pipe, name), folder / name)
