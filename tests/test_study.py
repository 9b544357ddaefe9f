"""Tests of sr3d/study.py and `sr3d study`: making the page, tallying answers, and the page in Chromium."""
import filecmp
import json
import math
import os
import pathlib
import shutil

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from sr3d import baselines, cli, degrade, study

N_CASES = 6
PAGE_FILES = ("index.html", "study.js", "study.css")
# Crop (i, j, k) of the IXI files (W, H, D of the volume): 16 slices of 96 x 96 from the middle.
CROP = (slice(12, 108), slice(12, 108), slice(37, 53))


@pytest.fixture(scope="module")
def scans(ixi_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("scans")
    paths = []
    for path in ixi_files[:2]:
        cropped = nib.load(path).slicer[CROP]
        paths.append(out / path.name.replace(".nii.gz", "_crop.nii.gz"))
        nib.save(cropped, paths[-1])
    return paths


@pytest.fixture(scope="module")
def config(scans, tiny_bundle_dir):
    return study.StudyConfig(scans=tuple(str(s) for s in scans), methods=("cnn", "lanczos"), scale=2,
                             n=N_CASES, seed=7, model_dir=str(tiny_bundle_dir))


@pytest.fixture(scope="module")
def study_dir(config, tmp_path_factory):
    return study.make_study(config, tmp_path_factory.mktemp("studies") / "study")


def _key(directory: pathlib.Path) -> dict:
    return json.loads((directory / "key.json").read_text())


def _page_cases(directory: pathlib.Path) -> list[dict]:
    html = (directory / "index.html").read_text()
    start = html.index('<script id="study-data" type="application/json">') + len(
        '<script id="study-data" type="application/json">')
    return json.loads(html[start:html.index("</script>", start)])["cases"]


# ---------------------------------------------------------------------------- make


def test_make_writes_page_images_and_key(study_dir, config):
    key = _key(study_dir)
    ids = [f"case_{i:03d}" for i in range(N_CASES)]
    assert list(key["cases"]) == ids
    assert sorted(p.name for p in study_dir.iterdir()) == sorted(["images", "key.json", *PAGE_FILES])
    expected_images = sorted(f"{case}_{suffix}.png" for case in ids for suffix in ("a", "b", "ref"))
    assert sorted(p.name for p in (study_dir / "images").iterdir()) == expected_images
    assert key["scale"] == 2 and key["seed"] == 7 and key["methods"] == ["cnn", "lanczos"]
    assert key["scans"] == list(config.scans)
    for case in key["cases"].values():
        assert sorted((case["left"], case["right"])) == ["cnn", "lanczos"]
        assert case["scan"] in config.scans and 0 <= case["slice"] < 16
    # Balanced sides: the CNN is on the left in exactly half of the cases.
    assert sum(case["left"] == "cnn" for case in key["cases"].values()) == N_CASES // 2
    # No slice is shown twice.
    assert len({(c["scan"], c["slice"]) for c in key["cases"].values()}) == N_CASES
    for case in _page_cases(study_dir):
        for side in ("left", "ref", "right"):
            image = matplotlib.image.imread(study_dir / case[side])
            assert image.shape == (case["height"], case["width"]) == (96, 96)


def test_page_does_not_reveal_the_methods_or_load_the_key(study_dir):
    for name in PAGE_FILES:
        text = (study_dir / name).read_text().lower()
        for method in study.METHODS:
            assert method not in text, f"{name} names the method {method!r}"
        assert "key.json" not in text, f"{name} refers to the key"
        assert "http:" not in text and "https:" not in text, f"{name} refers to a network resource"
    cases = _page_cases(study_dir)
    assert [sorted(c) for c in cases] == [["height", "id", "left", "ref", "right", "width"]] * N_CASES
    for case in cases:
        assert case["left"] == f"images/{case['id']}_a.png"
        assert case["right"] == f"images/{case['id']}_b.png"
        assert case["ref"] == f"images/{case['id']}_ref.png"


def _window(truth: np.ndarray, image: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(truth, [0.5, 99.5])
    return np.clip(np.rint((image.astype(np.float64) - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)


def test_images_are_the_windowed_slices_on_the_sides_the_key_says(study_dir):
    key = _key(study_dir)
    for case_id, case in key["cases"].items():
        # nibabel's (i, j, k) = (W, H, D); IXI's j runs inferior -> superior and the page shows
        # superior at the top, so rows are flipped.
        hr_whd = np.asarray(nib.load(case["scan"]).dataobj, dtype=np.float32)
        hr = np.ascontiguousarray(hr_whd.transpose(2, 1, 0))
        lanczos = baselines.upscale(degrade.downscale(hr, 2, (0, 1, 2)), 2, "lanczos", "3d")
        truth = hr[case["slice"]]
        shown = {suffix: np.rint(matplotlib.image.imread(study_dir / "images" / f"{case_id}_{suffix}.png")
                                 * 255).astype(np.uint8)
                 for suffix in ("a", "b", "ref")}
        np.testing.assert_array_equal(shown["ref"], _window(truth, truth)[::-1])
        lanczos_side, cnn_side = ("a", "b") if case["left"] == "lanczos" else ("b", "a")
        np.testing.assert_array_equal(shown[lanczos_side], _window(truth, lanczos[case["slice"]])[::-1])
        assert not np.array_equal(shown[cnn_side], shown[lanczos_side])


def test_make_is_deterministic_for_a_seed(study_dir, config, tmp_path):
    again = study.make_study(config, tmp_path / "again")
    names = sorted(str(p.relative_to(study_dir)) for p in study_dir.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(again)) for p in again.rglob("*") if p.is_file())
    match, mismatch, errors = filecmp.cmpfiles(study_dir, again, names, shallow=False)
    assert (mismatch, errors) == ([], [])


def test_another_seed_gives_another_study(config, tmp_path):
    cheap = dict(scans=config.scans, methods=("lanczos", "nearest"), n=N_CASES)
    one = _key(study.make_study(study.StudyConfig(**cheap, seed=1), tmp_path / "one"))
    two = _key(study.make_study(study.StudyConfig(**cheap, seed=2), tmp_path / "two"))
    assert one["study_id"] != two["study_id"]
    assert one["cases"] != two["cases"]


@pytest.mark.parametrize("changes, message", [
    ({"methods": ("lanczos", "lanczos")}, "two different methods"),
    ({"methods": ("cnn", "sinc")}, "unknown method 'sinc'"),
    ({"scale": 1}, "scale must be an integer >= 2"),
    ({"n": 0}, "positive integer"),
    ({"scans": ()}, "at least one scan"),
])
def test_config_rejects_bad_values(config, changes, message):
    fields = dict(scans=config.scans, methods=config.methods, n=N_CASES)
    with pytest.raises(ValueError, match=message):
        study.StudyConfig(**{**fields, **changes})


def test_make_rejects_used_directories_and_too_many_cases(config, tmp_path):
    cheap = study.StudyConfig(scans=config.scans, methods=("lanczos", "bicubic"), n=N_CASES)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "key.json").write_text("{}")
    with pytest.raises(ValueError, match="used: already exists"):
        study.make_study(cheap, tmp_path / "used")
    with pytest.raises(ValueError, match="asked for 1000 cases but the scans hold only 32"):
        study.make_study(study.StudyConfig(scans=config.scans, methods=("lanczos", "bicubic"), n=1000),
                         tmp_path / "big")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["used"]


def test_make_leaves_nothing_behind_on_failure(config, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise ValueError("reconstruction failed")

    monkeypatch.setattr(study, "reconstruct", fail)
    cheap = study.StudyConfig(scans=config.scans, methods=("lanczos", "bicubic"), n=N_CASES)
    with pytest.raises(ValueError, match="reconstruction failed"):
        study.make_study(cheap, tmp_path / "study")
    assert list(tmp_path.iterdir()) == []


def test_informative_slices_skip_empty_background():
    volume = np.zeros((6, 20, 20), np.float32)
    volume[1:5, 4:16, 4:16] = np.random.default_rng(0).uniform(50, 100, (4, 12, 12))
    volume[2, :, :] = 0  # an empty slice inside the head
    np.testing.assert_array_equal(study.informative_slices(volume), [1, 3, 4])


# ---------------------------------------------------------------------------- tally

# A hand-made key: 10 cases, the CNN on the left in cases 0-4 and on the right in 5-9.
HAND_KEY = {
    "format": study.KEY_FORMAT, "study_id": "feedc0de", "methods": ["cnn", "lanczos"], "scale": 2,
    "seed": 0, "scans": ["a.nii.gz"],
    "cases": {f"case_{i:03d}": {"left": "cnn", "right": "lanczos"} if i < 5 else
              {"left": "lanczos", "right": "cnn"} for i in range(10)},
}


def _answers(path: pathlib.Path, reader: str, sides: str, study_id: str = "feedc0de") -> pathlib.Path:
    """sides: one letter per case, L or R."""
    answers = {f"case_{i:03d}": {"L": "left", "R": "right"}[s] for i, s in enumerate(sides)}
    path.write_text(json.dumps({"study_id": study_id, "reader": reader, "answers": answers,
                                "completed": len(answers) == 10, "timestamp": "2024-01-01T00:00:00Z"}))
    return path


@pytest.fixture
def hand_study(tmp_path):
    (tmp_path / "key.json").write_text(json.dumps(HAND_KEY))
    # Ann picks the CNN in 7 cases: cases 0-4 on the left (5), cases 5-6 on the right (2).
    ann = _answers(tmp_path / "answers_Ann.json", "Ann", "LLLLL" "RRLLL")
    # Bob picks the CNN in every case.
    bob = _answers(tmp_path / "answers_Bob.json", "Bob", "LLLLL" "RRRRR")
    return tmp_path / "key.json", ann, bob


def _two_sided_binomial(k: int, n: int) -> float:
    """Exact two-sided p of k successes in n fair trials: 2 P(X <= min(k, n - k)), capped at 1."""
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def test_tally_counts_and_binomial_p_values(hand_study):
    key, ann, bob = hand_study
    result = study.tally([ann, bob], key)
    assert [r["reader"] for r in result["readers"]] == ["Ann", "Bob"]
    assert [r["counts"] for r in result["readers"]] == [{"cnn": 7, "lanczos": 3}, {"cnn": 10, "lanczos": 0}]
    np.testing.assert_allclose(result["readers"][0]["percent"]["cnn"], 70.0, rtol=1e-12)
    # Hand arithmetic: 2 * (1 + 10 + 45 + 120) / 1024 and 2 / 1024.
    np.testing.assert_allclose(_two_sided_binomial(7, 10), 352 / 1024, rtol=1e-15)
    np.testing.assert_allclose([r["p_value"] for r in result["readers"]], [352 / 1024, 2 / 1024], rtol=1e-9)
    overall = result["overall"]
    assert overall["counts"] == {"cnn": 17, "lanczos": 3} and overall["total"] == 20
    np.testing.assert_allclose(overall["percent"]["cnn"], 85.0, rtol=1e-12)
    np.testing.assert_allclose(overall["p_value"], _two_sided_binomial(17, 20), rtol=1e-9)
    np.testing.assert_allclose(overall["p_value"], 2 * (1 + 20 + 190 + 1140) / 2 ** 20, rtol=1e-9)


def test_tally_markdown_follows_table_7(hand_study):
    key, ann, bob = hand_study
    text = study.tally_markdown(study.tally([ann, bob], key))
    assert "| Reader | 2x cnn | 2x lanczos | p (two-sided binomial) |" in text
    assert "| Ann | 7 (70.00%) | 3 (30.00%) | 0.344 |" in text
    assert "| Bob | 10 (100.00%) | 0 (0.00%) | 0.00195 |" in text
    assert "| Overall | 17 | 3 | 0.00258 |" in text
    assert "| Overall in % | 85.00% | 15.00% | |" in text


@pytest.mark.parametrize("reader, sides, study_id, message", [
    ("Cy", "LLLLLRRLLL", "0ther", "answers are for study '0ther', not for study 'feedc0de'"),
    (" ann ", "LLLLLRRLLL", "feedc0de", "reader 'ann' already answered in .*answers_Ann.json"),
    ("Cy", "LLLLLRR", "feedc0de", r"incomplete: 3 of 10 cases unanswered \(case_007, case_008, case_009\)"),
])
def test_tally_rejects_bad_answer_files(hand_study, reader, sides, study_id, message):
    key, ann, _ = hand_study
    bad = _answers(key.parent / "bad.json", reader, sides, study_id)
    with pytest.raises(ValueError, match=f"bad.json: {message}"):
        study.tally([ann, bad], key)


def test_tally_rejects_unreadable_files(hand_study):
    key, ann, _ = hand_study
    broken = key.parent / "broken.json"
    broken.write_text('{"study_id": ')
    with pytest.raises(ValueError, match="broken.json: answers file is not valid JSON"):
        study.tally([broken], key)
    with pytest.raises(ValueError, match="answers_Ann.json: not an sr3d study key"):
        study.tally([ann], ann)


def test_cli_tally_writes_markdown_and_json(hand_study, capsys):
    key, ann, bob = hand_study
    assert cli.main(["study", "tally", str(ann), str(bob), "--key", str(key)]) == 0
    assert "| Overall | 17 | 3 |" in capsys.readouterr().out
    assert "| Ann | 7 (70.00%) |" in (key.parent / "tally.md").read_text()
    written = json.loads((key.parent / "tally.json").read_text())
    assert written["overall"]["counts"] == {"cnn": 17, "lanczos": 3}
    assert cli.main(["study", "tally", str(ann), str(ann), "--key", str(key)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sr3d study: error:" in err and "already answered" in err


def test_cli_make_rejects_bad_methods(config, tmp_path, capsys):
    argv = ["study", "make", "--scans", *config.scans, "--methods", "cnn", "--out", str(tmp_path / "s")]
    assert cli.main(argv) == 2
    assert "exactly two different methods" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_cli_make_writes_the_study_the_api_writes(config, study_dir, tmp_path, capsys):
    argv = ["study", "make", "--scans", *config.scans, "--methods", ",".join(config.methods),
            "--scale", str(config.scale), "--n", str(config.n), "--seed", str(config.seed),
            "--model", config.model_dir, "--out", str(tmp_path / "s")]
    assert cli.main(argv) == 0
    assert f"{tmp_path / 's' / 'index.html'} in a browser" in capsys.readouterr().err
    # Same config, same study: the page and its key are byte for byte the API's.
    for name in ("index.html", "key.json"):
        assert (tmp_path / "s" / name).read_bytes() == (study_dir / name).read_bytes(), name


# ---------------------------------------------------------------------------- the page in a browser

def _chromium_and_playwright():
    """(executable, sync_playwright) or a skip; in CI (env CI set) a missing browser is a failure."""
    executable = shutil.which("chromium") or "/usr/bin/chromium"
    problems = []
    if not os.path.exists(executable):
        problems.append("chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
        problems.append("playwright is not installed (pip install playwright)")
    if problems:
        if os.environ.get("CI"):
            pytest.fail("the browser test must run in CI: " + "; ".join(problems))
        pytest.skip("; ".join(problems))
    return executable, sync_playwright


@pytest.fixture(scope="module")
def browser_study_dir(config, tmp_path_factory):
    """Interpolations only: the page's behaviour does not depend on the methods, and unlike the
    untrained test network they give images worth a screenshot (docs/reader_study.png)."""
    cheap = study.StudyConfig(scans=config.scans, methods=("lanczos", "nearest"), n=N_CASES, seed=11)
    return study.make_study(cheap, tmp_path_factory.mktemp("browser") / "study")


@pytest.mark.slow
def test_reader_completes_the_study_in_chromium(browser_study_dir, tmp_path):
    executable, sync_playwright = _chromium_and_playwright()
    study_dir = browser_study_dir
    cases = _page_cases(study_dir)
    # The reader's pattern: left for even cases, right for odd ones; after going back from
    # case 5 to case 4 (index 3) the reader changes that answer to left.
    chosen = ["left" if i % 2 == 0 else "right" for i in range(N_CASES)]
    requests, errors = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 720})
            page = context.new_page()
            page.on("request", lambda request: requests.append(request.url))
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto((study_dir / "index.html").as_uri())
            page.fill("#reader-name", "Dr. Ann Example")
            page.keyboard.press("Enter")
            assert page.inner_text("#progress") == f"0 / {N_CASES}"

            def press(index):
                if index % 3 == 2:  # every third answer with the buttons under the images
                    page.click("#answer-left" if chosen[index] == "left" else "#answer-right")
                else:
                    page.keyboard.press("ArrowLeft" if chosen[index] == "left" else "ArrowRight")

            for index in range(3):
                press(index)
            page.reload()
            assert page.inner_text("#progress") == f"3 / {N_CASES}"
            assert page.inner_text("#case-label") == f"Case 4 of {N_CASES}"
            assert page.get_attribute("#panel-left img", "src") == cases[3]["left"]

            frame = page.locator("#panel-ref .frame").bounding_box()
            page.mouse.move(frame["x"] + 0.45 * frame["width"], frame["y"] + 0.35 * frame["height"])
            geometry = page.evaluate("""() => ['panel-left', 'panel-ref', 'panel-right'].map(id => {
                const frame = document.querySelector('#' + id + ' .frame').getBoundingClientRect();
                const loupe = document.querySelector('#' + id + ' .loupe');
                const box = loupe.getBoundingClientRect();
                return {visible: getComputedStyle(loupe).display !== 'none',
                        fx: (box.left + box.width / 2 - frame.left) / frame.width,
                        fy: (box.top + box.height / 2 - frame.top) / frame.height,
                        position: loupe.style.backgroundPosition,
                        image: loupe.style.backgroundImage};
            })""")
            assert [g["visible"] for g in geometry] == [True, True, True]
            np.testing.assert_allclose([[g["fx"], g["fy"]] for g in geometry], [[0.45, 0.35]] * 3, atol=0.01)
            assert len({g["position"] for g in geometry}) == 1
            assert [g["image"] for g in geometry] == [f'url("{cases[3][s]}")' for s in ("left", "ref", "right")]
            page.screenshot(path=str(tmp_path / "reader_study.png"))
            page.mouse.move(1, 1)
            assert not page.locator("#panel-ref .loupe").is_visible()

            press(3)
            page.keyboard.press("Backspace")
            assert page.inner_text("#case-label") == f"Case 4 of {N_CASES}"
            chosen[3] = "left" if chosen[3] == "right" else "right"
            for index in range(3, N_CASES):
                press(index)
            assert page.inner_text("#progress") == f"{N_CASES} / {N_CASES}"
            assert page.locator("#done").is_visible()
            with page.expect_download() as download_info:
                page.click("#save")
            download = download_info.value
            assert download.suggested_filename == "answers_Dr_Ann_Example.json"
            answers_path = tmp_path / download.suggested_filename
            download.save_as(answers_path)
        finally:
            browser.close()

    assert errors == []
    assert all(url.startswith(study_dir.as_uri() + "/") for url in requests), requests
    saved = json.loads(answers_path.read_text())
    assert saved["reader"] == "Dr. Ann Example" and saved["completed"] is True
    assert saved["answers"] == {case["id"]: side for case, side in zip(cases, chosen)}
    key = _key(study_dir)
    expected = sum(key["cases"][case["id"]][side] == "lanczos" for case, side in zip(cases, chosen))
    result = study.tally([answers_path], study_dir / "key.json")
    assert result["readers"][0]["counts"] == {"lanczos": expected, "nearest": N_CASES - expected}
    png = (tmp_path / "reader_study.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("SR3D_STUDY_SCREENSHOT"):  # regenerate docs/reader_study.png
        shutil.copyfile(tmp_path / "reader_study.png", os.environ["SR3D_STUDY_SCREENSHOT"])
