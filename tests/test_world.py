import numpy as np

from tools import world


def test_render_is_deterministic_and_views_differ():
    ident = world.identity("person", "catalog", 3, seed=0)
    a, a_bg = world.render(ident, 0)
    b, b_bg = world.render(world.identity("person", "catalog", 3, seed=0), 0)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and np.array_equal(np.asarray(a_bg), np.asarray(b_bg))
    c, _ = world.render(ident, 1)
    assert np.abs(np.asarray(a, float) - np.asarray(c, float)).mean() > 5
    assert a.size == (world.IMAGE_SIZE, world.IMAGE_SIZE) and a.mode == "RGB"


def test_splits_and_seeds_give_different_identities():
    p = world.identity("person", "catalog", 0, seed=0).params
    assert p != world.identity("person", "pretrain", 0, seed=0).params
    assert p != world.identity("person", "catalog", 0, seed=1).params
    assert p != world.identity("person", "catalog", 1, seed=0).params


def test_background_render_is_the_image_without_the_subject():
    for cls in world.CLASSES:
        img, bg = (np.asarray(x, float) for x in world.render(world.identity(cls, "catalog", 0), 2))
        diff = np.abs(img - bg).sum(-1)
        centre, corner = diff[24:40, 24:40].mean(), diff[:6, :6].mean()
        assert centre > 30 and corner < centre / 3, cls


def test_generate_writes_folders_and_catalog_entries(tmp_path):
    entries = world.generate(tmp_path, per_class=1, classes=("cat", "vase"), n_images=3, n_reference=2,
                             progress=False)
    assert [e["class"] for e in entries] == ["cat", "vase"]
    for e in entries:
        assert len(list((tmp_path / e["images"]).glob("*.png"))) == 3
        assert len(list((tmp_path / e["reference"]).glob("*.png"))) == 2
        assert len(list((tmp_path / e["backgrounds"]).glob("*.png"))) == 3


def test_unknown_class_is_an_error():
    import pytest

    with pytest.raises(ValueError, match="unknown class"):
        world.identity("dragon", "catalog", 0)


def test_pretraining_captions_are_varied_and_hold_out_the_gray_box_templates():
    from tools.evaluate import load_suite

    caps = [world.caption(world.identity(c, "pretrain", i, 0), v) for c in world.CLASSES for i in range(40)
            for v in range(4)]
    assert caps == [world.caption(world.identity(c, "pretrain", i, 0), v) for c in world.CLASSES
                    for i in range(40) for v in range(4)]                                    # deterministic
    assert 0.25 < sum(c.startswith("a photo of a ") and c[13:] in world.CLASSES for c in caps) / len(caps) < 0.45
    assert len(set(caps)) > len(caps) / 2
    for cls, nouns in world.CLASS_SYNONYMS.items():
        assert nouns[0] == cls and any(n in c.split() for c in caps for n in nouns[1:])
    # the attacker's held-out wording is language the base model read, but never its exact template
    skeletons = {t.replace("a {}", "{}").replace("the {}", "{}") for t in world.CAPTION_TEMPLATES}
    for a in load_suite("gray-box")[1]:
        assert a.template.replace("{identifier} {cls}", "{}") not in skeletons
