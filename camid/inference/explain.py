"""Why this camera: per-patch camera probabilities over a whole photo, and Grad-CAM inside one patch.

`patch_map` scores CFA-aligned patches on a grid over the photo (`camid.core.patches.grid_offsets`, the grid
`camid predict --full-image` uses) with `Ensemble.predict`, and the same patches as one photo through the one
photo-scoring path (`camid.inference.answers`), so the photo answer is exactly the one batch prediction and the
served model give for those patches.
`grad_cam` weighs the last spatial (4-D) feature map feeding the camera head of one member by the gradient
of log P(camera), as in Selvaraju et al. 2017; the gradients need the TensorFlow, JAX or PyTorch backend.
`save_figure` draws both (matplotlib, Agg, no pyplot state) and writes the PNG atomically.
"""
from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from camid.core.fileio import atomic_path
from camid.core.patches import auto_patch_count, grid_crops, grid_offsets
from camid.errors import CamidError
from camid.inference.answers import Cut, answers, score_photos
from camid.inference.options import MAX_PATCHES

log = logging.getLogger(__name__)

GRADIENT_BACKENDS = ("tensorflow", "jax", "torch")
CANVAS_SIDE = 640  # the figure's maps are drawn on a canvas about this many pixels on its longer side


@dataclass
class PatchMap:
    shape: tuple[int, int]           # the photo's (height, width)
    patch: int                       # patch side P
    offsets: np.ndarray              # (K, 2) int (top, left), both even (CFA-aligned)
    probs: np.ndarray                # (K, C) calibrated camera probabilities per patch, rows sum to 1
    labels: list[str]                # the C camera labels
    photo_probs: np.ndarray          # (C,) the whole-photo answer (`Ensemble.predict_photos` on the K patches)
    manipulated: bool                # the photo's manipulated flag (given, or estimated by the model)
    views: tuple[int, ...]           # the D4 views scored
    stride: int | None = None        # the stride asked for (None: the photo tiled without overlap)
    requested: int = 0               # patches the stride (or tiling) asked for, before the cap
    capped: bool = False             # True when `requested` was over the cap and K is the cap
    notes: list[str] = field(default_factory=list)
    answer: dict = field(default_factory=dict)  # the photo's row of the answer table (`camid.inference.answers`)

    @property
    def photo_index(self) -> int:
        return int(np.argmax(self.photo_probs))

    @property
    def camera(self) -> str:
        return self.labels[self.photo_index]

    @property
    def probability(self) -> float:
        return float(self.photo_probs[self.photo_index])

    @property
    def runner_up(self) -> tuple[str, float]:
        second = int(np.argsort(self.photo_probs)[-2]) if len(self.photo_probs) > 1 else self.photo_index
        return self.labels[second], float(self.photo_probs[second])

    @property
    def patch_labels(self) -> np.ndarray:
        """(K,) each patch's own argmax camera index."""
        return self.probs.argmax(axis=1)

    @property
    def agreement(self) -> float:
        """The fraction of patches whose own argmax is the photo's camera."""
        return float(np.mean(self.patch_labels == self.photo_index))

    @property
    def most_confident(self) -> int:
        """The patch most sure of the photo's camera (where Grad-CAM looks)."""
        return int(np.argmax(self.probs[:, self.photo_index]))

    def to_json(self) -> dict:
        runner, runner_p = self.runner_up
        return {
            "shape": list(self.shape), "patch": self.patch, "stride": self.stride, "views": list(self.views),
            "requested_patches": self.requested, "patches": len(self.offsets), "capped": self.capped,
            "labels": list(self.labels),
            "offsets": self.offsets.astype(int).tolist(),
            "probs": self.probs.astype(float).tolist(),
            "patch_camera": [self.labels[i] for i in self.patch_labels],
            "photo": {"camera": self.camera, "probability": self.probability,
                      "probs": dict(zip(self.labels, self.photo_probs.astype(float).tolist())),
                      "manipulated": bool(self.manipulated), "runner_up": runner, "runner_up_probability": runner_p,
                      "agreement": self.agreement},
            "answer": {key: _plain(self.answer.get(key)) for key in VERDICT_KEYS if key in self.answer},
            "notes": list(self.notes),
        }


VERDICT_KEYS = ("camera", "closest_camera", "camera_group", "confidence", "unknown", "tables_evidence", "exif_model", "exif_camera",
                "consistent")


def _plain(value):
    """A pandas/numpy scalar as a JSON value (NA: None)."""
    if value is None or value is pd.NA:
        return None
    return value.item() if hasattr(value, "item") else value


def grid_count(shape: tuple[int, ...], patch: int, stride: int | None) -> int:
    """Patches a stride asks for on the photo: one per `stride` step along each axis (None: the photo tiled
    without overlap, `auto_patch_count` with no limit)."""
    height, width = shape[:2]
    if height < patch or width < patch:
        raise CamidError(f"the photo is {width}x{height}, smaller than the model's {patch}x{patch} patch: "
                         f"explain a photo at least {patch} px on each side")
    if stride is None:
        return auto_patch_count(shape, patch, limit=math.inf)
    if stride < 2:
        raise CamidError(f"--stride must be at least 2 pixels (patch offsets are even), got {stride}")
    return ((height - patch) // stride + 1) * ((width - patch) // stride + 1)


def patch_map(ensemble, pixels: np.ndarray, *, stride: int | None = None, max_patches: int = MAX_PATCHES,
              tta: bool = True, manipulated: bool | None = None, signature=None, exif_model=None) -> PatchMap:
    """Score uint8 RGB `pixels` (H, W, 3) patch by patch on a CFA-aligned grid, and as one photo.

    `stride` spaces the grid (None: tiled without overlap); the grid is `camid.core.patches.grid_offsets`, so
    offsets are even and spread from edge to edge, which makes the step the stride rounded to fit the photo.
    At most `max_patches` are scored (the served model's cap); a note says when that cut the grid.
    `manipulated` (None: estimated) and the JPEG-table `signature` (None: none) are passed on as batch
    prediction passes them, so the photo answer is the one `camid predict --full-image` gives for these patches.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise CamidError(f"expected RGB pixels (H, W, 3), got shape {pixels.shape}")
    if max_patches < 1:
        raise CamidError(f"max_patches must be at least 1, got {max_patches}")
    size = ensemble.patch
    requested = grid_count(pixels.shape, size, stride)
    count = min(requested, max_patches)
    notes = []
    offsets = np.array(grid_offsets(pixels.shape, size, count), dtype=int)
    if requested > max_patches:
        notes.append(f"capped at {max_patches} patches (the grid asked for {requested}); "
                     "a larger --stride covers the photo more evenly")
        log.warning(notes[-1])
    crops = grid_crops(pixels, size, len(offsets))
    pred = ensemble.predict(crops, None if manipulated is None else np.full(len(crops), bool(manipulated), object),
                            tta=tta)
    # The photo answer through the one photo-scoring path, as `camid predict --full-image` answers these patches.
    photo = Cut(crops, signature, exif_model, tuple(pixels.shape[:2]))
    answer = answers(ensemble, score_photos(ensemble, [photo], flags=[manipulated], tta=tta), {"tta": tta}).iloc[0]
    return PatchMap(shape=tuple(pixels.shape[:2]), patch=size, offsets=offsets, probs=pred.probs,
                    labels=list(ensemble.labels), photo_probs=answer[list(ensemble.labels)].to_numpy(np.float64),
                    manipulated=bool(answer.manipulated), views=tuple(pred.views), stride=stride, requested=requested,
                    capped=requested > max_patches, notes=notes, answer=answer.to_dict())


# -- Grad-CAM -------------------------------------------------------------------------------------------------
def _is_submodel(layer) -> bool:
    import keras

    return isinstance(layer, keras.Model) and bool(getattr(layer, "layers", None))


def _single_output(layer):
    try:
        out = layer.output
    except (AttributeError, ValueError):  # a layer never called, or called more than once
        return None
    return out if hasattr(out, "shape") else None


def spatial_path(model) -> list:
    """The layers down to the last one whose output is 4-D (N, h, w, k) before the heads: [layer] in a flat
    model, [sub-model, ..., layer] when the backbone is nested (a sub-model whose own output is pooled)."""
    for layer in reversed(model.layers):
        if type(layer).__name__ == "InputLayer":
            continue
        if _is_submodel(layer):
            inner = spatial_path(layer)
            if inner:
                return [layer, *inner]
        out = _single_output(layer)
        if out is not None and len(out.shape) == 4:
            return [layer]
    return []


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _split(model, path: list, outputs):
    """Two callables over `model.inputs` (a flat list of tensors): head(xs) -> the feature map at path[-1],
    tail(feature map, xs) -> `outputs` (tensors of `model`'s graph). Keras builds both from the model's own
    graph (intermediate tensors as inputs), so they share its layers and weights."""
    import keras

    first = path[0]
    if len(path) == 1:
        features = first.output
        head = keras.Model(model.inputs, features)
        rest = keras.Model([features, *model.inputs], outputs)
        return head, lambda c, xs: rest([c, *xs])
    node = first._inbound_nodes[0]  # where the outer graph calls the sub-model
    pre = keras.Model(model.inputs, list(node.input_tensors))
    post = keras.Model([*node.output_tensors, *model.inputs], outputs)
    sub_head, sub_tail = _split(first, path[1:], list(first.outputs))

    def head(xs):
        return sub_head(_as_list(pre(xs)))

    def tail(c, xs):
        return post([*_as_list(sub_tail(c, _as_list(pre(xs)))), *xs])

    return head, tail


_SPLITS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _camera_split(model):
    """(head, tail, layer name) for a camid model's camera output, built once per model."""
    cached = _SPLITS.get(model)
    if cached is None:
        path = spatial_path(model)
        if not path:
            raise CamidError(f"Grad-CAM: {model.name} has no layer with a spatial (4-D) output before its camera "
                             "head; the per-patch map still works (use --no-gradcam)")
        outputs = model.output
        camera = outputs["camera"] if isinstance(outputs, dict) else _as_list(outputs)[0]
        try:
            head, tail = _split(model, path, camera)
        except (ValueError, AttributeError, IndexError) as exc:
            raise CamidError(f"Grad-CAM: cannot split {model.name} at {'/'.join(l.name for l in path)} "
                             f"({exc}); the per-patch map still works (use --no-gradcam)") from None
        cached = (head, tail, "/".join(layer.name for layer in path))
        _SPLITS[model] = cached
    return cached


def gradcam_layer(ensemble, member: int = 0) -> str:
    """The layer Grad-CAM looks at in a member, as sub-model/layer names."""
    return _camera_split(ensemble.models[member])[2]


def check_backend() -> None:
    """CamidError unless the Keras backend can give Grad-CAM its gradients."""
    import keras

    backend = keras.backend.backend()
    if backend not in GRADIENT_BACKENDS:
        raise CamidError(f"Grad-CAM needs gradients from the {', '.join(GRADIENT_BACKENDS)} Keras backend; this "
                         f"one is {backend!r} (set KERAS_BACKEND). The per-patch map still works (use --no-gradcam)")


def _score_and_gradient(features, score_fn):
    """score_fn(features) -> scalar, and its gradient with respect to `features`, on the active backend."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(features)
            score = score_fn(features)
        return tape.gradient(score, features)
    if backend == "jax":
        import jax

        return jax.grad(score_fn)(features)
    if backend == "torch":
        import torch

        features = features.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(score_fn(features), features)
        return grad
    check_backend()


def grad_cam(ensemble, patch: np.ndarray, class_index: int, member: int = 0,
             manipulated: bool | None = None) -> np.ndarray:
    """Grad-CAM of camera `class_index` for one uint8 patch (P, P, 3) in member `member`: a (P, P) float map in
    [0, 1], 1 where the evidence for that camera is strongest.

    The last spatial feature map A (h, w, k) feeding the camera head is weighted per channel by the spatial
    mean of d log P(class) / dA, summed, rectified and upsampled (bilinear) to the patch. A map that rectifies
    to nothing (every region speaks against the class) is shown min-max scaled instead, so it still ranks the
    regions. `manipulated` (None: estimated by the ensemble) is the flag fed to the model.
    """
    from keras import ops

    check_backend()
    patch = np.asarray(patch)
    size = ensemble.patch
    if patch.shape != (size, size, 3):
        raise CamidError(f"Grad-CAM takes one ({size}, {size}, 3) patch, got {patch.shape}")
    if not 0 <= member < len(ensemble.models):
        raise CamidError(f"member {member} out of range: the ensemble has {len(ensemble.models)}")
    if not 0 <= class_index < len(ensemble.labels):
        raise CamidError(f"class {class_index} out of range: the ensemble has {len(ensemble.labels)} cameras")
    if manipulated is None:
        manipulated = bool(ensemble.predict(patch[None], tta=False).manipulated[0])
    model = ensemble.models[member]
    head, tail, _ = _camera_split(model)
    feed = {"image": patch[None].astype("float32"), "manipulated": np.full((1, 1), float(manipulated), "float32")}
    if not {t.name for t in model.inputs} <= set(feed):
        raise CamidError(f"Grad-CAM: {model.name} takes inputs {[t.name for t in model.inputs]}, not camid's "
                         "image and manipulated")
    xs = [ops.convert_to_tensor(feed[t.name]) for t in model.inputs]
    features = head(xs)

    def score(a):
        return ops.sum(ops.log(ops.maximum(tail(a, xs)[:, class_index], 1e-12)))

    grads = _score_and_gradient(features, score)
    weights = ops.mean(grads, axis=(1, 2), keepdims=True)       # (1, 1, 1, k)
    raw = ops.sum(weights * features, axis=-1, keepdims=True)    # (1, h, w, 1)
    raw = ops.convert_to_numpy(ops.image.resize(raw, (size, size), interpolation="bilinear"))[0, :, :, 0]
    raw = raw.astype(np.float64)
    cam = np.maximum(raw, 0)
    if cam.max() <= 0:
        cam = raw - raw.min()
    top = cam.max()
    return np.clip(cam / top, 0, 1) if top > 0 else np.zeros_like(cam)


# -- the figure -----------------------------------------------------------------------------------------------
def _canvas(pm: PatchMap) -> tuple[int, np.ndarray, np.ndarray]:
    """(factor, mean probabilities (h, w, C) over the patches covering each canvas cell, coverage (h, w))."""
    height, width = pm.shape
    factor = max(1, math.ceil(max(height, width) / CANVAS_SIDE))
    h, w = math.ceil(height / factor), math.ceil(width / factor)
    total = np.zeros((h, w, pm.probs.shape[1]))
    count = np.zeros((h, w))
    for (top, left), p in zip(pm.offsets, pm.probs):
        rows = slice(top // factor, max(top // factor + 1, (top + pm.patch) // factor))
        cols = slice(left // factor, max(left // factor + 1, (left + pm.patch) // factor))
        total[rows, cols] += p
        count[rows, cols] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count[..., None]
    return factor, mean, count


def render_figure(pm: PatchMap, pixels: np.ndarray, cam: np.ndarray | None = None, *, title: str = "",
                  gradcam_note: str = ""):
    """A matplotlib Figure (no pyplot): the photo; P(photo camera) per patch over it; each region's argmax
    camera with a legend; Grad-CAM over the most confident patch (or why there is none)."""
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle
    import matplotlib

    factor, mean, count = _canvas(pm)
    thumb = np.asarray(pixels)[::factor, ::factor]
    height, width = pm.shape
    extent = (0, width, height, 0)
    covered = count > 0
    fig = Figure(figsize=(13, 10.5), layout="constrained")
    axes = fig.subplots(2, 2)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    runner, runner_p = pm.runner_up
    fig.suptitle(title or f"photo: {pm.camera} (p={pm.probability:.2f}); runner-up {runner} (p={runner_p:.2f}); "
                 f"{pm.agreement:.0%} of {len(pm.offsets)} patches agree", fontsize=12)

    ax = axes[0, 0]
    ax.imshow(thumb, extent=extent)
    ax.set_title(f"photo {width}x{height}")

    ax = axes[0, 1]
    ax.imshow(thumb, extent=extent)
    heat = np.where(covered, mean[..., pm.photo_index], np.nan)
    image = ax.imshow(heat, extent=extent, cmap="magma", vmin=0, vmax=1, alpha=0.6, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label=f"P({pm.camera}) per patch")
    ax.set_title(f"P({pm.camera}) over {len(pm.offsets)} patches of {pm.patch} px")
    best = pm.most_confident
    top, left = pm.offsets[best]
    ax.add_patch(Rectangle((left, top), pm.patch, pm.patch, fill=False, edgecolor="cyan", linewidth=1.5))

    ax = axes[1, 0]
    n = len(pm.labels)
    colours = matplotlib.colormaps["tab20" if n > 10 else "tab10"].colors[:n]
    cmap = ListedColormap(colours)
    category = np.where(covered, np.nan_to_num(mean).argmax(axis=-1), np.nan)
    ax.imshow(thumb, extent=extent)
    ax.imshow(category, extent=extent, cmap=cmap, norm=BoundaryNorm(np.arange(n + 1) - 0.5, n), alpha=0.7,
              interpolation="nearest")
    shares = np.bincount(pm.patch_labels, minlength=n) / len(pm.offsets)
    present = [i for i in np.argsort(-shares) if shares[i] > 0]
    ax.legend(handles=[Patch(color=colours[i], label=f"{pm.labels[i]} {shares[i]:.0%}") for i in present],
              loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9, title="argmax camera (share of patches)")
    ax.set_title("each region's most likely camera")

    ax = axes[1, 1]
    crop = np.asarray(pixels)[top:top + pm.patch, left:left + pm.patch]
    ax.imshow(crop, interpolation="nearest")
    if cam is not None:
        ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
        ax.set_title(f"Grad-CAM for {pm.camera}, patch at ({top}, {left}), p={pm.probs[best, pm.photo_index]:.2f}"
                     + (f"\n{gradcam_note}" if gradcam_note else ""), fontsize=10)
    else:
        ax.set_title(f"most confident patch at ({top}, {left}), p={pm.probs[best, pm.photo_index]:.2f}\n"
                     + (gradcam_note or "no Grad-CAM"), fontsize=10)
    return fig


def save_figure(pm: PatchMap, pixels: np.ndarray, out, cam: np.ndarray | None = None, *, figure=None,
                **kwargs) -> Path:
    """Draw the figure (or take one `render_figure` drew) and write it to `out` (PNG) atomically: a failure
    leaves no file behind."""
    fig = figure if figure is not None else render_figure(pm, pixels, cam, **kwargs)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    return Path(out)
