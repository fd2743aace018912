"""Linear probes (experiments/linear_probes.py): they find a class that is there and not one that is not."""

import numpy as np

from linear_probes import linear_probe


def blobs(rng, n, classes=4, dim=16, separation=3.0, shuffle_labels=False):
    centres = rng.standard_normal((classes, dim)) * separation
    labels = rng.integers(0, classes, n)
    x = centres[labels] + rng.standard_normal((n, dim))
    return x, (rng.permutation(labels) if shuffle_labels else labels)


def test_probe_finds_separable_classes_and_not_random_labels():
    rng = np.random.default_rng(0)
    x, y = blobs(rng, 600)
    result = linear_probe((x[:400], y[:400]), (x[400:500], y[400:500]), (x[500:], y[500:]))
    assert result.test_accuracy > 0.9 and result.val_accuracy > 0.9
    x, y = blobs(rng, 600, shuffle_labels=True)
    chance = linear_probe((x[:400], y[:400]), (x[400:500], y[400:500]), (x[500:], y[500:]))
    assert chance.test_accuracy < 0.45  # 4 classes: about 0.25


def test_weight_decay_is_chosen_on_validation_only():
    rng = np.random.default_rng(1)
    x, y = blobs(rng, 300, dim=200, separation=0.3)  # few samples, many dimensions: decay matters
    train, val, test = (x[:100], y[:100]), (x[100:200], y[100:200]), (x[200:], y[200:])
    chosen = linear_probe(train, val, test)
    assert chosen.weight_decay in (1e-4, 1e-3, 1e-2, 1e-1)
    assert chosen.val_accuracy == max(linear_probe(train, val, test, weight_decays=[wd]).val_accuracy
                                      for wd in (1e-4, 1e-3, 1e-2, 1e-1))
