"""The islands explorer (``--mode islands --islands_html``): its data (int8 vectors, masks, ground truth), the
page it writes for a toy-set checkpoint and for photos, and that page in a real headless browser (chromium via
Selenium; skipped with the reason where none is installed): click a column, move the slider, switch images."""

import base64
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from browser import headless_chromium, wait_for
from test_main import run_main

from partwhole.common.mask_io import read_distinct_masks, save_masks, unpack_mask_rows
from partwhole.islands.html import (
    ground_truth_mask_set,
    render_islands_page,
    similarity_data,
    stage1_mask_set,
)
from partwhole.islands.scores import cosine_similarity_matrix, label_points
from partwhole.toy.dataset import generate_toy_dataset, oracle_masks, render_scene

GRID = 8  # the toy set's 64 px images in 8 px patches; the model's 16 x 16 tokens in 2 x 2 patches: 8 x 8 columns
STATES = 7  # the initial state and iters = 2 * levels
TOY_FLAGS = ["--dataset=TOY", "--image_size=64", "--conv_image_size=16", "--patch_size=2", "--patch_dim=32",
             "--levels=3", "--n_classes=10", "--num_workers=0", "--precision=32"]


def page_data(page: Path) -> dict:
    """The JSON the page carries (its ``<script id="islands-data">``)."""
    html = page.read_text()
    return json.loads(re.search(r'<script type="application/json" id="islands-data">(.*?)</script>', html, re.S).group(1))


def page_cosines(image: dict) -> np.ndarray:
    """The cosines one image's page data holds, ``(states, levels, n, n)``, decoded in Python (vectors or triangle)."""
    raw = np.frombuffer(base64.b64decode(image["similarities"]), np.int8).astype(np.float64)
    states, levels, n = image["states"], image["levels"], image["grid"] ** 2
    if image["encoding"] == "vectors":
        vectors = raw.reshape(states * levels, n, image["dim"])
        return np.stack([cosine_similarity_matrix(v) for v in vectors]).reshape(states, levels, n, n)
    full = np.zeros((states, levels, n, n))
    rows, cols = np.triu_indices(n)
    full[..., rows, cols] = full[..., cols, rows] = raw.reshape(states, levels, -1) / 127
    return full


# --------------------------------------------------------------------------- the data


@pytest.mark.parametrize("columns, dim, expected", [(16, 24, "triangle"), (36, 8, "vectors")])
def test_both_int8_encodings_keep_the_cosines_and_auto_picks_the_smaller(columns, dim, expected):
    rng = np.random.default_rng(0)
    iterations = rng.normal(size=(STATES, columns, 3, dim)) + 2.0  # a shared component, as trained columns have
    iterations[3, 5, 1] = 0.0  # a zero vector: similarity 0 to all (and to itself)
    exact = np.stack([[cosine_similarity_matrix(iterations[t, :, level]) for level in range(3)] for t in range(STATES)])
    sizes = {}
    for encoding in ("vectors", "triangle"):
        data = similarity_data(torch.from_numpy(iterations), encoding)
        image = {"states": STATES, "levels": 3, "grid": math.isqrt(columns), "dim": dim, **data}
        shown = page_cosines(image)
        assert 0 < np.abs(shown - exact).max() <= data["cosine_error"] < 0.01
        np.testing.assert_allclose(np.diagonal(shown, axis1=2, axis2=3)[[0, 1, 2, 4, 5, 6]], 1.0, atol=1e-12)
        sizes[encoding] = len(data["similarities"])
    assert similarity_data(iterations, "auto")["encoding"] == expected == min(sizes, key=sizes.get)
    with pytest.raises(ValueError, match="encoding='int4'"):
        similarity_data(iterations, "int4")


def test_mask_sets_hold_every_points_masks(tmp_path):
    scene = render_scene(3, 64, np.random.default_rng(1), distractor_prob=1.0)
    masks = oracle_masks(scene, 64 // GRID)
    save_masks(tmp_path / "m.pkl", masks)
    stage1 = stage1_mask_set(read_distinct_masks(tmp_path / "m.pkl"), "m.pkl")
    label_maps = [scene.parts, scene.objects, (scene.objects > 0).astype(np.int32)]
    truth = ground_truth_mask_set(label_maps, GRID, "gt")
    points = label_points(GRID, 64)
    for mask_set, expected in ((stage1, masks), (truth, None)):
        bits = np.frombuffer(base64.b64decode(mask_set["bits"]), np.uint8).reshape(-1, mask_set["bytes_per_mask"])
        distinct = unpack_mask_rows(bits, mask_set["height"], mask_set["width"])
        index = np.array(mask_set["index"])
        assert index.shape == (GRID * GRID, 3) and len(distinct) == index.max() + 1 < GRID * GRID * 3
        for k, (x, y) in enumerate(points):
            for level in range(3):
                shown = distinct[index[k, level]]
                want = expected[k, level] if expected is not None else label_maps[level] == label_maps[level][y, x]
                np.testing.assert_array_equal(shown, want)
    assert truth["level_names"] == ["part", "object", "all objects"]


def test_page_is_self_contained_and_escapes_titles():
    image = {"name": "x", "title": "a</script><script>alert(1)</script>.png", "vectors": ""}
    html = render_islands_page([image], heading="h <b>")
    assert html.count("</script>") == 2  # the data's and the script's own: a title cannot close them
    assert "http://" not in html and "https://" not in html and "<script src" not in html
    with pytest.raises(ValueError, match="no images"):
        render_islands_page([], heading="h")


# --------------------------------------------------------------------------- the pages a checkpoint gives


def untrained_checkpoint(folder: Path, patch_dim: int) -> Path:
    """An untrained model of the toy set's geometry (8 x 8 columns, 3 levels) as a checkpoint file. ``patch_dim``
    picks the page's encoding: 32 (2,048 int8 values per map as vectors, 2,080 as a triangle) vectors, 64 the triangle."""
    from partwhole.agglomerator.lit_module import AgglomeratorLitModule

    torch.manual_seed(0)
    model = dict(image_size=64, conv_image_size=16, patch_size=2, patch_dim=patch_dim, levels=3, n_classes=10)
    module = AgglomeratorLitModule(model=model, objective="sam_distill")
    path = folder / f"toy_{patch_dim}.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("checkpoint"), 32)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, checkpoint) -> Path:
    """``--mode islands --islands_html`` on two images of a generated toy set (stage-1 masks and ground truth)."""
    data = tmp_path_factory.mktemp("data")
    generate_toy_dataset(data / "toy", train_per_class=0, val_per_class=1, progress=False)
    run = data / "run"
    proc = run_main(*TOY_FLAGS, f"--data_dir={data}", "--mode=islands", "--islands_html", "--islands_count=2",
                    f"--load_checkpoint_dir={checkpoint}", f"--output_dir={run}")
    assert re.search(rf"islands: explorer page {re.escape(str(run / 'islands.html'))} \(0\.\d\d MB, 2 images\)", proc.stdout)
    return run


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory) -> Path:
    """``--islands_images`` on two real photos (scikit-image's astronaut and coffee): no stage-1 masks."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(skimage_data, name)()).save(folder / f"{name}.png")
    run = folder / "run"
    run_main(*TOY_FLAGS, "--patch_dim=64", f"--data_dir={folder}", "--mode=islands", "--islands_html",
             f"--islands_images={folder / 'astronaut.png'},{folder / 'coffee.png'}",
             f"--load_checkpoint_dir={untrained_checkpoint(folder, 64)}", f"--output_dir={run}")
    return run


@pytest.mark.slow
def test_toy_page_carries_the_scores_json_scores_and_both_mask_sets(toy_run):
    data = page_data(toy_run / "islands.html")
    scores = json.loads((toy_run / "islands" / "scores.json").read_text())
    assert [image["title"] for image in data["images"]] == ["00_tower/tower_0000.png", "09_table/table_0000.png"]
    for key in ("stage1_masks", "ground_truth"):
        for t in range(STATES):
            for level in "012":
                for score in ("pair_corr", "ari"):
                    values = [image["scores"][key][t][level][score] for image in data["images"]]
                    finite = [v for v in values if v is not None]
                    expected = scores["per_iteration"][key][t][level][score]
                    assert (np.mean(finite) if finite else None) == pytest.approx(expected)  # the page's images average to it
    for image in data["images"]:
        assert (image["grid"], image["levels"], image["states"], image["dim"], image["encoding"]) == (GRID, 3, STATES, 32, "vectors")
        assert image["masks"]["source"].startswith("val_masks/") and image["ground_truth"] is not None
        assert image["image"].startswith("data:image/png;base64,") and 0 < image["cosine_error"] < 0.01


@pytest.mark.slow
def test_photo_page_says_there_are_no_masks(photo_run):
    data = page_data(photo_run / "islands.html")
    assert [image["title"] for image in data["images"]] == ["given/astronaut.png", "given/coffee.png"]
    for image in data["images"]:
        assert image["masks"] is None and image["ground_truth"] is None and image["scores"] == {}
        assert (image["dim"], image["encoding"]) == (64, "triangle") and 0 < image["cosine_error"] <= 0.5 / 127
        assert "an image given as a file" in image["masks_note"]


@pytest.mark.slow
def test_no_images_is_a_one_line_error_naming_the_flag(tmp_path, checkpoint):
    generate_toy_dataset(tmp_path / "toy", train_per_class=0, val_per_class=1, progress=False)
    proc = run_main(*TOY_FLAGS, f"--data_dir={tmp_path}", "--mode=islands", "--islands_html", "--islands_count=0",
                    f"--load_checkpoint_dir={checkpoint}", f"--output_dir={tmp_path / 'run'}", expect_ok=False)
    assert proc.returncode != 0
    assert re.search(r"^error: --islands_count=0: no images to show on the islands page \(.*toy/val\)$", proc.stderr, re.M)


# --------------------------------------------------------------------------- in a browser


@pytest.fixture(scope="module")
def driver():
    browser = headless_chromium()
    yield browser
    browser.quit()


def open_page(driver, page: Path, rendered: str) -> None:
    driver.get(page.as_uri())
    wait_for(driver, f"return document.body.dataset.rendered === '{rendered}'")


def shown_maps(driver) -> np.ndarray:
    return np.array(driver.execute_script("return [0, 1, 2].map((l) => islandsExplorer.similarities(l))"))


def click_column(driver, row: int, col: int) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = driver.find_element("id", "input-canvas")
    cell = canvas.size["width"] / GRID  # Selenium's offsets count from the element's centre
    offset = lambda i: round((i + 0.5) * cell - canvas.size["width"] / 2)  # noqa: E731
    ActionChains(driver).move_to_element_with_offset(canvas, offset(col), offset(row)).click().perform()


def severe_console_entries(driver) -> list:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_toy_page_in_a_browser(driver, toy_run):
    """Click a column, move the slider, switch images; the maps are the cosines of the page's vectors; no console errors."""
    page = toy_run / "islands.html"
    data = page_data(page)
    open_page(driver, page, f"0:{4 * GRID + 4}:{STATES - 1}")  # the first image, the centre column, the final state
    before = shown_maps(driver)
    click_column(driver, 1, 6)
    wait_for(driver, f"return document.body.dataset.rendered === '0:{GRID + 6}:{STATES - 1}'")
    after = shown_maps(driver)
    cosines = page_cosines(data["images"][0])
    for level in range(3):
        assert not np.allclose(after[level], before[level])
        assert after[level][GRID + 6] == pytest.approx(1.0, abs=1e-12)  # the chosen column scores 1 with itself
        np.testing.assert_allclose(after[level], cosines[-1, level, GRID + 6], atol=1e-12)
    captions = [e.text for e in driver.find_elements("css selector", "#level-maps figcaption")]
    assert captions[2].startswith(f"cosine similarity of level 2 vectors to column (1, 6), iteration {STATES - 1}")
    mask_captions = [e.text for e in driver.find_elements("css selector", "#mask-panels figcaption")]
    assert len(mask_captions) == 6 and all("of point (1, 6)" in c for c in mask_captions)  # stage-1 and ground truth

    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    slider = driver.find_element("id", "iteration")
    slider.send_keys(Keys.HOME)
    wait_for(driver, f"return document.body.dataset.rendered === '0:{GRID + 6}:0'")
    np.testing.assert_allclose(shown_maps(driver), 1.0, atol=1e-12)  # t0: every column starts alike
    slider.send_keys(Keys.ARROW_RIGHT)
    wait_for(driver, f"return document.body.dataset.rendered === '0:{GRID + 6}:1'")
    first_iteration = shown_maps(driver)
    assert first_iteration.min() < 0.99
    np.testing.assert_allclose(first_iteration[1], cosines[1, 1, GRID + 6], atol=1e-12)
    assert "t1" in driver.find_element("id", "scores").text and "t6 (final)" in driver.find_element("id", "scores").text

    Select(driver.find_element("id", "image-picker")).select_by_index(1)
    wait_for(driver, f"return document.body.dataset.rendered === '1:{4 * GRID + 4}:{STATES - 1}'")
    other = shown_maps(driver)
    np.testing.assert_allclose(other[0], page_cosines(data["images"][1])[-1, 0, 4 * GRID + 4], atol=1e-12)
    assert f"{data['images'][1]['scores']['stage1_masks'][-1]['2']['ari']:.3f}" in driver.find_element("id", "scores").text
    assert severe_console_entries(driver) == []


def test_photo_page_in_a_browser(driver, photo_run):
    """The triangle encoding in the browser; the mask panel and the scores say there are none."""
    page = photo_run / "islands.html"
    open_page(driver, page, f"0:{4 * GRID + 4}:{STATES - 1}")
    assert "an image given as a file" in driver.find_element("id", "no-masks").text
    assert driver.find_elements("css selector", ".mask-map") == []
    assert driver.find_element("id", "scores").text.startswith("No scores")
    click_column(driver, 7, 0)
    wait_for(driver, f"return document.body.dataset.rendered === '0:{7 * GRID}:{STATES - 1}'")
    np.testing.assert_allclose(shown_maps(driver), page_cosines(page_data(page)["images"][0])[-1, :, 7 * GRID], atol=1e-12)
    assert shown_maps(driver)[:, 7 * GRID] == pytest.approx(1.0, abs=1e-12)
    assert severe_console_entries(driver) == []
