"""`camid explain IMAGE --model URI --out heatmap.png`: why the model named this camera.

Scores CFA-aligned patches on a grid over the whole photo (`camid.inference.explain.patch_map`) and draws
the photo, P(the photo's camera) per patch over it, each region's most likely camera, and Grad-CAM inside
the patch most sure of the answer. `--json` keeps the numbers. The photo answer is the one
`camid predict --full-image` gives for the same patches (same flag from `_manip`/`_unalt` names, same
JPEG-table evidence).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from camid.core.fileio import write_json
from camid.core.imageio import ImageError, decode_image
from camid.errors import CamidError
from camid.inference.options import MAX_PATCHES, OPTIONS

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", type=Path, help="the photo to explain (JPEG, PNG or TIFF)")
    parser.add_argument("--model", required=True,
                        help="ensemble bundle folder or MLflow model URI (e.g. models:/camid@champion)")
    parser.add_argument("--out", type=Path, required=True, help="the figure (PNG)")
    parser.add_argument("--json", type=Path, help="also write the numbers here: per-patch offsets and "
                        "probabilities, labels, the photo answer")
    parser.add_argument("--stride", type=int, default=None,
                        help="pixels between patch positions (default: the photo tiled without overlap); "
                             f"at most {MAX_PATCHES} patches are scored")
    parser.add_argument("--no-tta", dest="tta", action="store_false", default=OPTIONS["tta"].default,
                        help="score the identity view only (default: the views the model's evaluation chose)")
    parser.add_argument("--no-gradcam", dest="gradcam", action="store_false", help="skip Grad-CAM")


def _load_model(uri: str):
    from camid.inference.ensemble import load_ensemble

    try:
        return load_ensemble(uri)
    except CamidError:
        raise
    except Exception as exc:  # a broken .keras file, a folder that is neither a bundle nor an MLflow model
        raise CamidError(f"cannot load model {uri!r}: {type(exc).__name__}: {exc}. Pass an ensemble bundle folder "
                         "(camid evaluate writes one) or an MLflow model URI such as models:/camid@champion") from None


def run(args: argparse.Namespace) -> int:
    from camid.forensics.inspect import header_facts
    from camid.inference import explain
    from camid.inference.answers import flag_from_name

    path: Path = args.image
    if not path.is_file():
        raise CamidError(f"{path} not found: give the path of a JPEG, PNG or TIFF photo")
    try:
        data = path.read_bytes()
        pixels = decode_image(data)
    except (ImageError, OSError) as exc:
        raise CamidError(f"cannot read {path}: {exc}") from None
    ensemble = _load_model(args.model)
    if min(pixels.shape[:2]) < ensemble.patch:
        raise CamidError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]}, smaller than the model's "
                         f"{ensemble.patch}x{ensemble.patch} patch: explain a larger photo")
    pm = explain.patch_map(ensemble, pixels, stride=args.stride, tta=args.tta, manipulated=flag_from_name(path),
                           signature=header_facts(data)["jpeg_tables"], exif_model=header_facts(data)["model"])
    cam, note, gradcam = None, "Grad-CAM off (--no-gradcam)", None
    if args.gradcam:
        top, left = pm.offsets[pm.most_confident]
        try:
            cam = explain.grad_cam(ensemble, pixels[top:top + pm.patch, left:left + pm.patch], pm.photo_index,
                                   manipulated=pm.manipulated)
            note = f"{ensemble.names[0]}: {explain.gradcam_layer(ensemble)}"
            gradcam = {"member": ensemble.names[0], "layer": explain.gradcam_layer(ensemble),
                       "offset": [int(top), int(left)], "camera": pm.camera}
        except CamidError as exc:
            note = "no Grad-CAM: " + str(exc).split(";")[0].split(". ")[0]
            log.warning("%s", exc)
    fig = explain.render_figure(pm, pixels, cam, gradcam_note=note)  # drawn before anything is written
    try:
        explain.save_figure(pm, pixels, args.out, figure=fig)
        if args.json:
            try:
                write_json(args.json, {"image": str(path), "model": str(args.model), **pm.to_json(),
                                       "gradcam": gradcam})
            except BaseException:
                args.out.unlink(missing_ok=True)  # both or neither
                raise
    except OSError as exc:
        raise CamidError(f"cannot write the results: {exc}; check that --out and --json name writable files") from None
    runner, runner_p = pm.runner_up
    verdict = pm.answer.get("camera", pm.camera)
    answer = pm.camera if verdict == pm.camera else f"{verdict} (closest {pm.camera})"
    print(f"{path.name}: {answer} (p={pm.probability:.3f}); {pm.agreement:.0%} of {len(pm.offsets)} patches agree; "
          f"runner-up {runner} (p={runner_p:.3f})")
    for line in pm.notes:
        print(f"note: {line}")
    print(f"figure: {args.out}" + (f"; numbers: {args.json}" if args.json else ""))
    return 0
