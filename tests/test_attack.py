"""The attack changes a copy of the model and leaves the original alone."""
import pytest
import torch

from tools import transforms
from tools.attack import AttackSettings, attack
from train.catalog import load_catalog, load_images
from train.pipelines import load_pipeline


@pytest.fixture(scope="module")
def person(world_catalog):
    entry = load_catalog(world_catalog)[0]
    return load_images(entry.images, 64), entry.cls


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
@pytest.mark.parametrize("method", ["dreambooth", "lora"])
def test_attack_changes_a_copy(name, method, person):
    pipe = load_pipeline(name)
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    attacked = attack(pipe, *person, AttackSettings(method=method, steps=3, num_class_images=2, transform="jpeg:75"))
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in original.items())
    state = attacked.unet.state_dict()
    if method == "lora":
        lora = {k: v for k, v in state.items() if "lora_B" in k}
        assert lora and any(v.abs().sum() > 0 for v in lora.values())  # B starts at zero, training moved it
    else:
        assert sum(not torch.equal(state[k], v) for k, v in original.items()) > len(original) // 2


def test_settings_validate_and_build_prompts():
    s = AttackSettings(identifier="ohwx", template="{identifier} {cls} portrait", class_noun="man")
    assert s.instance_prompt("person") == "ohwx man portrait" and s.class_prompt("person") == "man portrait"
    assert AttackSettings(method="lora").learning_rate > AttackSettings().learning_rate
    with pytest.raises(ValueError, match="method"):
        AttackSettings(method="textual-inversion")
    with pytest.raises(ValueError, match="must contain"):
        AttackSettings(template="a photo of {cls}")
    with pytest.raises(ValueError, match="bad transform"):
        AttackSettings(transform="sharpen:2")


@pytest.mark.parametrize("spec", ["jpeg:50", "blur:1.5", "resize:0.5", "crop:0.8", "noise:0.05", "resize:0.5+jpeg:75"])
def test_transforms_change_images_but_keep_shape(spec, person):
    images, _ = person
    out = transforms.apply(images, spec, seed=0)
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1
    assert 0.002 < (out - images).abs().mean() < 0.2
    assert torch.equal(out, transforms.apply(images, spec, seed=0))


def test_adaptive_attacker_options(person, world_catalog):
    """Pre-fine-tuning on clean retention data moves the weights before personalization starts; mixing a
    look-alike needs its images; a synonym map picks the noun per class."""
    images, cls = person
    pipe = load_pipeline("tiny-sd")
    plain = attack(pipe, images, cls, AttackSettings(steps=0, num_class_images=2, prior_preservation=False))
    pre = attack(pipe, images, cls, AttackSettings(steps=0, pre_finetune_steps=2, prior_preservation=False))
    moved = [k for k, v in pre.unet.state_dict().items() if not torch.equal(v, plain.unet.state_dict()[k])]
    assert len(moved) > len(plain.unet.state_dict()) // 2
    with pytest.raises(ValueError, match="mix_images"):
        attack(pipe, images, cls, AttackSettings(steps=1, mix_fraction=0.5))
    other = load_images(load_catalog(world_catalog)[1].images, 64)
    attack(pipe, images, cls, AttackSettings(steps=2, mix_fraction=0.5, prior_preservation=False), mix_images=other)
    s = AttackSettings(class_noun={"person": "human"})
    assert s.instance_prompt("person") == "a photo of sks human" and s.instance_prompt("cat") == "a photo of sks cat"
    with pytest.raises(ValueError, match="mix_fraction"):
        AttackSettings(mix_fraction=1.0)


def test_refitting_the_encoder_restores_reconstruction_and_leaves_the_released_model_alone(person):
    """Start from an encoder whose output was scrambled (what a guard does to protected photos): the
    attacker's re-fit brings decode(encode(photo)) back towards the photo; the decoder and the released
    pipeline's VAE are untouched."""
    images, cls = person
    pipe = load_pipeline("tiny-sd")
    with torch.no_grad():
        pipe.vae.quant_conv.weight.mul_(-0.3)

    def error(vae):
        with torch.no_grad():
            return (vae.decode(vae.encode(images * 2 - 1).latent_dist.mean).sample - (images * 2 - 1)).pow(2).mean()

    released = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    refit = attack(pipe, images, cls, AttackSettings(steps=0, refit_encoder_steps=150, prior_preservation=False))
    assert error(refit.vae) < 0.6 * error(pipe.vae)
    assert all(torch.equal(v, pipe.vae.state_dict()[k]) for k, v in released.items())
    assert all(torch.equal(v, refit.vae.state_dict()[k]) for k, v in released.items() if k.startswith("decoder."))
    with pytest.raises(ValueError, match="refit_encoder_steps"):
        AttackSettings(refit_encoder_steps=-1)
