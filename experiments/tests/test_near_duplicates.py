"""The leak check finds a test image copied (and re-encoded with noise) into a pool, and nothing in a clean pool."""

import numpy as np
from near_duplicates import report
from PIL import Image


def write(root, name, pixels):
    path = root / "a" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def test_a_copied_test_image_is_found_and_a_clean_pool_is_not(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    for i, image in enumerate(images[:3]):
        write(tmp_path / "test", f"{i}.png", image)
    clean = write(tmp_path / "clean", "x.png", images[3])
    write(tmp_path / "leaky", "x.png", images[4])
    noisy = np.clip(images[1].astype(int) + rng.integers(-1, 2, images[1].shape), 0, 255).astype(np.uint8)
    copy = write(tmp_path / "leaky", "y.png", noisy)

    pairs = report(tmp_path / "test", [tmp_path / "clean", tmp_path / "leaky"], threshold=0.01)

    assert [(p.name, q) for p, q, _ in pairs] == [("1.png", copy)]
    assert pairs[0][2] < 0.01 and clean not in [q for _, q, _ in pairs]


def test_an_empty_pool_is_named_in_one_line(tmp_path):
    import pytest

    from partwhole.common.errors import InputError

    write(tmp_path / "test", "0.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(InputError, match="empty: no images"):
        report(tmp_path / "test", [tmp_path / "empty"], threshold=0.01)
