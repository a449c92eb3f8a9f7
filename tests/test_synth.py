"""The virtual camera zoo: real JPEG files on disk, reopened with Pillow and checked the way the filter stage will."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from camid.data import synth
from camid.config import Catalog, ConfigError, SynthParams

EXIF_IFD = 0x8769


def ijg_reference(quality: int) -> tuple[int, int]:
    """ImageMagick's (hash, sum) reference pair for `quality`: IJG tables scaled by libjpeg's formula."""
    luma, chroma = synth.ijg_tables(quality)
    return int(luma[2] + luma[53] + chroma[0] + chroma[63]), int(luma.sum() + chroma.sum())


def imagemagick_quality(tables: dict) -> int:
    """`identify -format %Q` for a two-table JPEG (REFERENCE.md), enough to check the zoo's tables."""
    luma, chroma = np.array(tables[0]), np.array(tables[1])
    qvalue, total = luma[2] + luma[53] + chroma[0] + chroma[63], luma.sum() + chroma.sum()
    for quality in range(1, 101):
        ref_hash, ref_sum = ijg_reference(quality)
        if qvalue < ref_hash and total < ref_sum:
            continue
        return quality if (qvalue <= ref_hash and total <= ref_sum) or quality > 50 else 0
    return 100


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, catalog):
    out = tmp_path_factory.mktemp("zoo") / "zoo"
    params = SynthParams(seed=5, devices_per_model=2, images_per_device=2, bad_fraction=0.25, pipelines={})
    manifest = synth.synthesize(out, catalog, params, progress=False)
    return out, manifest


def _good(zoo):
    out, manifest = zoo
    return [(out / row.file, row) for row in manifest.itertuples() if not row.bad]


def test_layout_and_manifest(zoo, catalog):
    out, manifest = zoo
    assert list(manifest.columns) == ["file", "label", "device", "bad"]
    assert len(manifest) == len(catalog) * 2 * 2  # devices x photos per device
    on_disk = sorted(str(p.relative_to(out)) for p in (out / "train").rglob("*.jpg"))
    assert on_disk == sorted(manifest["file"])
    for row in manifest.itertuples():
        assert row.file.startswith(f"train/{row.label}/")
    assert set(manifest["label"]) == set(catalog.labels)
    assert (manifest.groupby("label")["device"].nunique() == 2).all()
    written = pd.read_csv(out / synth.MANIFEST, keep_default_na=False)
    pd.testing.assert_frame_equal(written, manifest)


def test_good_files_are_camera_originals(zoo, catalog):
    for path, row in _good(zoo):
        camera = catalog.get(row.label)
        with Image.open(path) as im:
            im.load()
            exif = im.getexif()
            sub = exif.get_ifd(EXIF_IFD)
            assert exif[0x010F] == camera.make
            assert camera.matches_model(exif[0x0110]), exif[0x0110]
            software = exif[0x0131]
            assert "Firmware" in software or "FW" in software or any(ch.isdigit() for ch in software)
            assert not any(editor in software for editor in ("Photoshop", "Lightroom", "GIMP"))
            assert exif[0x0132] and sub[0x9003] == exif[0x0132]
            assert exif[0x0112] == 1
            assert (sub[0xA002], sub[0xA003]) == im.size
            assert sub[0xA431] == row.device
            assert camera.is_native_size(im.height, im.width)
            assert imagemagick_quality(im.quantization) >= 94


def test_orientation_habits(zoo, catalog):
    shapes: dict[str, set] = {}
    for path, row in _good(zoo):
        with Image.open(path) as im:
            shapes.setdefault(row.label, set()).add(im.height > im.width)
    for camera in catalog.cameras:
        assert len(shapes[camera.label]) == (2 if camera.rot90 else 1), camera.label
        if not camera.rot90:
            native_portrait = camera.sizes[0][0] > camera.sizes[0][1]
            assert shapes[camera.label] == {native_portrait}


def test_firmware_twins_differ_only_in_firmware(zoo):
    a1, a1s = synth.pipeline_for("Aster-A1"), synth.pipeline_for("Aster-A1s")
    sensor = [f.name for f in dataclasses.fields(synth.Pipeline) if f.name not in synth.FIRMWARE_FIELDS]
    assert all(getattr(a1, name) == getattr(a1s, name) for name in sensor)
    assert (a1.gamma, a1.contrast) != (a1s.gamma, a1s.contrast)
    tables = {}
    for path, row in _good(zoo):
        if row.label in ("Aster-A1", "Aster-A1s"):
            with Image.open(path) as im:
                tables.setdefault(row.label, set()).add(tuple(tuple(t) for t in im.quantization.values()))
    assert len(tables["Aster-A1"]) == len(tables["Aster-A1s"]) == 1
    assert tables["Aster-A1"] != tables["Aster-A1s"]


def test_every_bad_kind_present_and_rejectable(zoo, catalog):
    out, manifest = zoo
    bad = manifest[manifest["bad"] != ""]
    kinds = {reason.split(":")[0] for reason in bad["bad"]}
    assert kinds == set(synth.BAD_KINDS)
    assert bad["label"].nunique() >= 5  # spread over cameras
    good_bytes = {(out / f).read_bytes() for f in manifest.loc[manifest["bad"] == "", "file"]}
    for row in bad.itertuples():
        kind, path, camera = row.bad.split(":")[0], out / row.file, catalog.get(row.label)
        if kind == "truncated":
            with Image.open(path) as im, pytest.raises(OSError):
                im.load()
            continue
        if kind == "duplicate":
            assert path.read_bytes() in good_bytes
            continue
        with Image.open(path) as im:
            im.load()
            exif = im.getexif()
            if kind == "edited":
                assert any(editor in exif[0x0131] for editor in ("Photoshop", "Lightroom", "GIMP"))
            elif kind == "recompressed":
                assert imagemagick_quality(im.quantization) < 94
            elif kind == "resized":
                assert not camera.is_native_size(im.height, im.width)
                sub = exif.get_ifd(EXIF_IFD)
                assert (sub[0xA002], sub[0xA003]) != im.size
            elif kind == "stripped":
                assert len(exif) == 0


def test_deterministic_for_a_seed(tmp_path, catalog):
    small = Catalog("small", (catalog.get("Corvid-C3"), catalog.get("Ember-E2")))
    params = SynthParams(seed=11, images_per_device=1, bad_fraction=0.5, pipelines={})

    def build(name, p):
        out = tmp_path / name
        manifest = synth.synthesize(out, small, p, progress=False)
        return manifest, {f: (out / f).read_bytes() for f in manifest["file"]}

    m1, files1 = build("a", params)
    m2, files2 = build("b", params)
    pd.testing.assert_frame_equal(m1, m2)
    assert files1 == files2
    _, files3 = build("c", dataclasses.replace(params, seed=12))
    assert files3.keys() == files1.keys() and all(files3[f] != files1[f] for f in files1)
    # Rebuilding into an existing folder replaces it whole.
    (tmp_path / "a" / "stale.txt").write_text("left over")
    build("a", params)
    assert not (tmp_path / "a" / "stale.txt").exists()


def test_the_same_bytes_whatever_simd_kernels_the_cpu_gives(tmp_path):
    """The zoo's bytes do not depend on the CPU: made once with numpy's and OpenBLAS's kernels for this CPU, once with
    every numpy SIMD kernel beyond the baseline turned off and OpenBLAS on its SSE kernel (what another CPU could
    run), they are the same. Before float64 transcendental functions in camid.data.synth, 4 of these 160 files
    (17 of the default zoo's 640) came out different."""
    import subprocess
    import sys

    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

    from tests.helpers_data import subprocess_env

    found = [feature for feature in __cpu_dispatch__ if __cpu_features__.get(feature)]
    if not found:
        pytest.skip("this CPU has no numpy SIMD kernels beyond the baseline to turn off")

    def make(name: str, **env: str) -> dict[str, bytes]:
        out = tmp_path / name
        subprocess.run([sys.executable, "-m", "camid", "synth", "--out", str(out), "--images-per-device", "4",
                        "--quiet"], env=subprocess_env(env), check=True, capture_output=True, timeout=300)
        return {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*.jpg"))}

    native = make("native")
    plain = make("plain", NPY_DISABLE_CPU_FEATURES=" ".join(found), OPENBLAS_CORETYPE="Nehalem")
    assert len(native) == 160 and plain.keys() == native.keys()
    assert [f for f in native if plain[f] != native[f]] == []


def test_pipeline_overrides_from_params(tmp_path, catalog):
    assert synth.pipeline_for("Corvid-C3", {"sharpen_amount": 0.1}).sharpen_amount == 0.1
    with pytest.raises(ConfigError, match="unknown field"):
        synth.pipeline_for("Corvid-C3", {"sharpness": 1})
    with pytest.raises(ConfigError, match="demosaic"):
        synth.pipeline_for("Corvid-C3", {"demosaic": "magic"})
    params = SynthParams(seed=1, images_per_device=1, bad_fraction=0.0, pipelines={"Nope-N1": {}})
    with pytest.raises(ConfigError, match="Nope-N1"):
        synth.synthesize(tmp_path / "z", catalog, params, progress=False)


def test_cli(tmp_path, monkeypatch, params):
    from camid.cli import main
    from tests.conftest import ROOT

    monkeypatch.chdir(ROOT)
    out = tmp_path / "cli_zoo"
    assert main(["synth", "--out", str(out), "--images-per-device", "1", "--seed", "3", "--quiet"]) == 0
    manifest = pd.read_csv(out / synth.MANIFEST, keep_default_na=False)
    assert (manifest.groupby("label").size() == params.synth.devices_per_model).all()


def _patch_features(patch: np.ndarray) -> list[float]:
    """Noise-residual statistics of one 64x64 patch in YCbCr: level and chroma-to-luma ratio (noise, chroma
    subsampling, noise reduction), spatial correlation (sharpening, demosaicing), CFA-phase energy."""
    ycc = patch @ np.array([[0.299, -0.169, 0.5], [0.587, -0.331, -0.419], [0.114, 0.5, -0.081]], np.float32)
    residual = ycc - ndimage.uniform_filter(ycc, (3, 3, 1))
    var = residual.var(axis=(0, 1)) + 1e-6
    features = [np.log(var[0]), np.log(var[1] / var[0]), np.log(var[2] / var[0])]
    for c in range(3):
        r = residual[..., c]
        phase = np.array([np.abs(r[i::2, j::2]).mean() for i in (0, 1) for j in (0, 1)])
        features += [(r[:, 1:] * r[:, :-1]).mean() / var[c], (r[1:] * r[:-1]).mean() / var[c],
                     (r[:, 2:] * r[:, :-2]).mean() / var[c], (r[2:] * r[:-2]).mean() / var[c],
                     *np.sort(phase / (phase.mean() + 1e-6))]
    return features


def test_traces_are_learnable_from_pixels(zoo, catalog):
    """A nearest-centroid classifier on residual statistics of 64 px patches, trained on one device of each
    model and tested on the other, beats chance clearly: the models differ in their pixels."""
    rng = np.random.default_rng(0)
    features, labels, train = [], [], []
    first_device = {}
    for path, row in _good(zoo):
        first_device.setdefault(row.label, row.device)
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"), np.float32)
        h, w, _ = pixels.shape
        for _ in range(24):
            y, x = 2 * rng.integers(0, (h - 64) // 2), 2 * rng.integers(0, (w - 64) // 2)
            features.append(_patch_features(pixels[y:y + 64, x:x + 64]))
            labels.append(catalog.index(row.label))
            train.append(row.device == first_device[row.label])
    X, y, train = np.array(features), np.array(labels), np.array(train)
    X = (X - X[train].mean(0)) / (X[train].std(0) + 1e-6)
    classes = np.unique(y[train])
    centroids = np.stack([X[train & (y == c)].mean(0) for c in classes])
    predicted = classes[np.argmin(((X[~train, None] - centroids[None]) ** 2).sum(-1), axis=1)]
    accuracy = (predicted == y[~train]).mean()
    assert accuracy > 2.5 / len(catalog), accuracy
    print(f"nearest-centroid accuracy on the other device: {accuracy:.2f} (chance {1 / len(catalog):.2f})")


def test_unlisted_camera_gets_a_stable_derived_pipeline():
    derived = synth.pipeline_for("Someone-X1")
    assert derived == synth.pipeline_for("Someone-X1")
    assert derived != synth.pipeline_for("Someone-X2")
    assert synth.exif_model_name("C3-*") == "C3-1200" and synth.exif_model_name("XT105[2-8]") == "XT1052"
