"""Islands scores and figures: exact islands score at the maximum, shuffled columns near zero, PNGs of the right size;
islands over the iterations: per-state scores, colours fixed across states, GIF frames and strip."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence
from torchmetrics.functional.clustering import adjusted_rand_score

from partwhole.islands.figures import (
    PcaColours,
    islands_figure,
    islands_strip_figure,
    iteration_colours,
    pca_rgb,
    save_islands_figure,
)
from partwhole.islands.gif import islands_iteration_frames, save_islands_gif
from partwhole.islands.scores import (
    adjusted_rand_index,
    average_linkage_clusters,
    connected_segments,
    islands_scores,
    islands_scores_batch,
    islands_scores_from_labels,
    islands_scores_from_labels_per_iteration,
    islands_scores_per_iteration,
    mask_iou_matrix,
)
from partwhole.toy.dataset import oracle_masks, patch_grid_points, render_scene

GRID, PATCH = 8, 8
SIZE = GRID * PATCH


def _segment_maps() -> list[np.ndarray]:
    """Three nested partitions of the 8x8 patch grid (8, 4 and 2 segments), as pixel label maps."""
    rows, cols = np.divmod(np.arange(GRID * GRID), GRID)
    cells = [(rows // 4) * 4 + cols // 2, cols // 2, cols // 4]
    return [np.kron(c.reshape(GRID, GRID), np.ones((PATCH, PATCH), np.int64)) for c in cells]


def _exact_islands(dim: int = 12, seed: int | None = None):
    """Columns equal within each segment, different across; masks = the segment under each point."""
    maps = _segment_maps()
    points = patch_grid_points(SIZE, PATCH).astype(int)
    rng = np.random.default_rng(seed)
    levels, masks = [], []
    for label_map in maps:
        seg = label_map[points[:, 1], points[:, 0]]
        if seed is None:  # one-hot: different segments are orthogonal
            levels.append(np.eye(dim)[seg])
        else:
            levels.append(rng.normal(size=(seg.max() + 1, dim))[seg])
        masks.append(label_map[None] == seg[:, None, None])
    return np.stack(levels, 1), np.stack(masks, 1), maps, points


def test_exact_islands_score_at_maximum():
    levels, masks, maps, points = _exact_islands()
    assert levels.shape == (64, 3, 12) and masks.shape == (64, 3, SIZE, SIZE)
    for scores in (islands_scores(levels, masks), islands_scores_from_labels(levels, maps, points)):
        assert set(scores) == {0, 1, 2}
        for level in scores.values():
            assert level["pair_corr"] == pytest.approx(1.0, abs=1e-9)
            assert level["ari"] == pytest.approx(1.0)
    # Non-orthogonal island vectors: still the same partition; correlation stays high.
    levels, masks, _, _ = _exact_islands(seed=1)
    for level in islands_scores(torch.from_numpy(levels).float(), torch.from_numpy(masks)).values():
        assert level["ari"] == pytest.approx(1.0) and level["pair_corr"] > 0.6


def test_shuffled_columns_score_near_zero():
    levels, masks, maps, points = _exact_islands()
    corr, ari = [], []
    for seed in range(10):
        shuffled = levels[np.random.default_rng(seed).permutation(len(levels))]
        for level in islands_scores(shuffled, masks).values():
            corr.append(level["pair_corr"])
            ari.append(level["ari"])
    assert abs(np.mean(corr)) < 0.2 and abs(np.mean(ari)) < 0.2
    assert max(ari) < 0.6  # no single shuffle comes close to the exact islands


def test_level_mapping_batch_and_labels_agree_with_masks():
    levels, masks, maps, points = _exact_islands()
    five = np.concatenate([levels, levels[:, 2:], levels[:, 2:]], 1)  # 5 model levels, 3 mask levels
    scores = islands_scores(five, masks)
    assert set(scores) == set(range(5)) and scores[4]["ari"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="level_map"):
        islands_scores(five, masks, level_map=[0, 1, 2])
    mixed = islands_scores(five, masks, level_map=[2, 1, 0, 0, 0])
    assert mixed[0]["ari"] < 1.0 and mixed[2]["ari"] < 1.0 and mixed[1]["ari"] == pytest.approx(1.0)
    shuffled = levels[np.random.default_rng(0).permutation(64)]
    batch = islands_scores_batch(np.stack([levels, shuffled]), np.stack([masks, masks]))
    single = islands_scores(shuffled, masks)
    for level in range(3):
        assert batch[level]["ari"] == pytest.approx((1.0 + single[level]["ari"]) / 2)
        assert batch[level]["pair_corr"] == pytest.approx((1.0 + single[level]["pair_corr"]) / 2)


def test_toy_oracle_masks_and_ground_truth_give_same_scores():
    scene = render_scene(4, SIZE, np.random.default_rng(2), distractor_prob=1.0)
    masks = oracle_masks(scene, PATCH)
    points = patch_grid_points(SIZE, PATCH).astype(int)
    on_object = scene.objects > 0
    label_maps = [
        np.where(on_object, scene.parts, 100 + scene.background),
        np.where(on_object, scene.objects, 100),
        on_object.astype(np.int64),
    ]
    noisy_islands = []
    rng = np.random.default_rng(0)
    for label_map in label_maps:
        seg = label_map[points[:, 1], points[:, 0]]
        noisy_islands.append(rng.normal(size=(seg.max() + 1, 16))[seg] + 0.05 * rng.normal(size=(64, 16)))
    levels = np.stack(noisy_islands, 1)
    from_masks, from_labels = islands_scores(levels, masks), islands_scores_from_labels(levels, label_maps)
    for level in range(3):
        assert from_masks[level]["ari"] == pytest.approx(1.0)
        assert from_masks[level] == pytest.approx(from_labels[level])


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_helpers():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.integers(0, 4, 50), rng.integers(0, 3, 50)
        assert adjusted_rand_index(a, b) == pytest.approx(float(adjusted_rand_score(torch.from_numpy(a), torch.from_numpy(b))), abs=1e-6)
    assert adjusted_rand_index([0, 0, 1, 1], [5, 5, 2, 2]) == 1.0 and adjusted_rand_index([1, 1, 1], [0, 0, 0]) == 1.0
    masks = np.zeros((3, 4, 4), bool)
    masks[0, :2] = masks[1, :1] = True
    np.testing.assert_allclose(mask_iou_matrix(masks), [[1, 0.5, 0], [0.5, 1, 0], [0, 0, 0]])
    vectors = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 1], [-1, 0]])
    assert list(average_linkage_clusters(vectors, 3)) == [0, 0, 1, 1, 2]
    colours = pca_rgb(vectors)
    assert colours.shape == (5, 3) and colours.min() >= 0 and colours.max() <= 1
    np.testing.assert_allclose(pca_rgb(np.ones((4, 6))), 0.5)


@pytest.mark.parametrize("with_teacher", [False, True])
def test_figure_png_of_expected_size(tmp_path, with_teacher):
    levels, _, _, _ = _exact_islands(seed=3)
    levels = torch.from_numpy(np.concatenate([levels, levels[:, :2]], 1)).float()  # 5 levels
    image = torch.randn(3, SIZE, SIZE)  # a normalised image
    teacher = torch.randn(64, 3, 20, dtype=torch.float16) if with_teacher else None
    fig = islands_figure(image, levels, teacher=teacher, title="epoch 0 step 10")
    path = save_islands_figure(fig, tmp_path / "figs" / "islands.png", dpi=50)
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == (6 * 2 * 50, (2 if with_teacher else 1) * 2 * 50)
    assert not list((tmp_path / "figs").glob("*.tmp"))


def test_figure_accepts_uint8_hwc_and_rejects_bad_shapes(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    levels = np.random.default_rng(1).normal(size=(64, 3, 8))
    save_islands_figure(islands_figure(image, levels, boundary_threshold=None), tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as png:
        assert png.size == (800, 200)
    with pytest.raises(ValueError, match="square grid"):
        islands_figure(image, levels[:60])


def _forming_islands(states: int = 4):
    """States from all-alike columns (t=0) to the exact islands (last), by linear blending, plus noise."""
    levels, masks, maps, points = _exact_islands(seed=5)
    start = np.broadcast_to(levels.mean(0, keepdims=True), levels.shape)
    rng = np.random.default_rng(0)
    iterations = np.stack([start + (t / (states - 1)) * (levels - start) for t in range(states)])
    iterations[1:] += 0.3 * rng.normal(size=iterations[1:].shape) * (1 - np.linspace(0, 1, states)[1:, None, None, None])
    return iterations, masks, maps, points


def test_per_iteration_scores_equal_the_single_state_scores_and_grow():
    iterations, masks, maps, points = _forming_islands()
    per_masks = islands_scores_per_iteration(iterations, masks)
    per_labels = islands_scores_from_labels_per_iteration(iterations, maps, points)
    assert len(islands_scores_per_iteration(torch.from_numpy(iterations).float(), torch.from_numpy(masks))) == 4
    assert len(per_masks) == len(per_labels) == 4
    for t, state in enumerate(iterations):
        single_masks, single_labels = islands_scores(state, masks), islands_scores_from_labels(state, maps, points)
        for level in range(3):
            assert per_masks[t][level] == pytest.approx(single_masks[level], nan_ok=True)
            assert per_labels[t][level] == pytest.approx(single_labels[level], nan_ok=True)
    for level in range(3):
        # Every column alike: one island, nothing to correlate, no better than chance.
        assert np.isnan(per_masks[0][level]["pair_corr"]) and per_masks[0][level]["ari"] == 0.0
        assert per_masks[-1][level]["ari"] == pytest.approx(1.0)
        assert per_masks[-1][level]["pair_corr"] > per_masks[1][level]["pair_corr"]
    rounding = torch.from_numpy(iterations[0]).float() * (1 + 1e-7 * torch.randn(iterations[0].shape))  # float32 noise
    assert all(np.isnan(s["pair_corr"]) and s["ari"] == 0.0 for s in islands_scores(rounding, masks).values())
    with pytest.raises(ValueError, match=r"\(t\+1, n, l, d\)"):
        islands_scores_per_iteration(iterations[0], masks)


def test_pca_colours_are_fixed_across_states():
    iterations, _, _, _ = _forming_islands()
    colours = iteration_colours(iterations)
    assert len(colours) == 3 and all(isinstance(c, PcaColours) for c in colours)
    # A colour depends on the vector only, not on the state it appears in or the vectors beside it.
    mixed = np.concatenate([iterations[0][:3, 2], iterations[-1][:3, 2]])
    rgb = colours[2](mixed)
    assert rgb.min() >= 0 and rgb.max() <= 1
    np.testing.assert_allclose(colours[2](iterations[-1][:3, 2]), rgb[3:])
    np.testing.assert_allclose(colours[2](iterations[0][:3, 2]), rgb[:3])
    np.testing.assert_allclose(rgb[0], rgb[1])  # the initial state: every column alike, one colour
    # A PCA fitted on the states together differs from one per state, which would recolour every frame.
    assert not np.allclose(colours[0](iterations[1][:, 0]), pca_rgb(iterations[1][:, 0]))
    # pca_rgb is the fit on its own vectors; on the fit vectors, the range is used to the full.
    vectors = np.random.default_rng(0).normal(size=(30, 7))
    fitted = PcaColours.fit(vectors)
    np.testing.assert_allclose(pca_rgb(vectors), fitted(vectors))
    assert np.abs(fitted(vectors) - 0.5).max() == pytest.approx(0.5)


def test_iteration_gif_has_one_frame_per_state_and_strip_has_a_panel_per_state(tmp_path):
    iterations, _, _, _ = _forming_islands(states=3)
    image = torch.randn(3, SIZE, SIZE)
    teacher = torch.randn(64, 3, 20)
    frames = islands_iteration_frames(image, iterations, teacher=teacher, title="cls/img.png", panel_inches=1.0, dpi=40)
    path = save_islands_gif(frames, tmp_path / "gifs" / "img.gif", frame_ms=100, last_frame_ms=500)
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.is_animated and gif.n_frames == 3
        assert gif.size == (4 * 40, 2 * 40)  # image + 3 levels wide, learned + teacher rows high
        durations = [frame.info["duration"] for frame in ImageSequence.Iterator(gif)]
        assert durations == [100, 100, 500]
        last = np.asarray(gif.convert("RGB"), np.float64)  # the frame shown last (the iterator left it there)
        gif.seek(0)
        first = np.asarray(gif.convert("RGB"), np.float64)
    # The last frame, redrawn in place, looks like a fresh figure of the last state with the same colours
    # (mean difference ~1.3 of 255 from the palettes; ~7 from the first frame).
    fresh = islands_figure(image, iterations[-1], teacher=teacher, title="cls/img.png: iteration 2 of 2",
                           panel_inches=1.0, level_colours=iteration_colours(iterations))
    with Image.open(save_islands_figure(fresh, tmp_path / "fresh.png", dpi=40)) as png:
        fresh_pixels = np.asarray(png.convert("RGB"), np.float64)
    assert np.abs(fresh_pixels - last).mean() < 3.0 < np.abs(fresh_pixels - first).mean()
    strip = save_islands_figure(islands_strip_figure(image, iterations, panel_inches=1.0), tmp_path / "strip.png", dpi=40)
    with Image.open(strip) as png:
        assert png.size == ((1 + 3) * 40, 3 * 40)  # image + 3 states wide, 3 levels high
    assert not list((tmp_path / "gifs").glob("*.tmp"))
    with pytest.raises(ValueError, match="no frames"):
        save_islands_gif([], tmp_path / "empty.gif")


# --------------------------------------------------------------------------- parity with the hand-written maths
# The islands' clustering, components and ARI were hand-written until they moved to scipy and torchmetrics;
# these are those functions as they were (commit dff7382), kept here as the reference the library versions
# must agree with on the same inputs.


def _first_appearance_reference(labels):
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def _connected_segments_reference(adjacency):
    n = len(adjacency)
    parent = np.arange(n)

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(adjacency, 1))):
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return _first_appearance_reference(np.array([find(i) for i in range(n)]))


def _average_linkage_reference(vectors, num_clusters):
    x = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    sim = x @ x.T
    n = len(sim)
    num_clusters = int(min(max(num_clusters, 1), n))
    np.fill_diagonal(sim, -np.inf)
    size, owner = np.ones(n), np.arange(n)
    for _ in range(n - num_clusters):
        i, j = np.unravel_index(int(np.argmax(sim)), sim.shape)
        i, j = min(i, j), max(i, j)
        merged = (size[i] * sim[i] + size[j] * sim[j]) / (size[i] + size[j])
        sim[i, :] = merged
        sim[:, i] = merged
        sim[i, i] = -np.inf
        sim[j, :] = -np.inf
        sim[:, j] = -np.inf
        size[i] += size[j]
        owner[owner == j] = i
    return _first_appearance_reference(owner)


def _ari_reference(a, b):
    a, b = np.unique(a, return_inverse=True)[1].reshape(-1), np.unique(b, return_inverse=True)[1].reshape(-1)
    n = len(a)
    if n < 2:
        return 1.0
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)
    pairs = lambda x: float((x * (x - 1) / 2).sum())  # noqa: E731
    both, in_a, in_b = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = in_a * in_b / pairs(np.array([n], np.float64))
    maximum = (in_a + in_b) / 2
    return 1.0 if maximum == expected else (both - expected) / (maximum - expected)


def test_connected_segments_match_the_hand_written_union_find():
    rng = np.random.default_rng(0)
    for n, density in [(1, 0.5), (5, 0.0), (16, 0.05), (64, 0.02), (64, 0.1), (196, 0.005)]:
        upper = np.triu(rng.random((n, n)) < density, 1)
        adjacency = upper | upper.T | np.eye(n, dtype=bool)
        np.testing.assert_array_equal(connected_segments(adjacency), _connected_segments_reference(adjacency))


def test_average_linkage_matches_the_hand_written_clustering():
    rng = np.random.default_rng(1)
    for n, d in [(2, 3), (9, 4), (16, 8), (64, 16)]:
        centres = rng.normal(size=(4, d))
        for vectors in (rng.normal(size=(n, d)), centres[rng.integers(0, 4, n)] + 0.3 * rng.normal(size=(n, d))):
            for k in sorted({1, 2, 3, n // 2, n - 1, n}):
                np.testing.assert_array_equal(average_linkage_clusters(vectors, k), _average_linkage_reference(vectors, k),
                                              err_msg=f"n={n} k={k}")


def test_ari_matches_the_hand_written_formula():
    rng = np.random.default_rng(2)
    cases = [(rng.integers(0, ka, n), rng.integers(0, kb, n)) for n, ka, kb in [(2, 2, 2), (10, 3, 2), (64, 6, 8), (196, 12, 5)]]
    cases += [(np.zeros(8, int), np.zeros(8, int)), (np.arange(8), np.arange(8)), (np.zeros(8, int), np.arange(8)), ([3], [1])]
    for a, b in cases:
        assert adjusted_rand_index(a, b) == pytest.approx(_ari_reference(np.asarray(a), np.asarray(b)), abs=1e-9)
