"""The members' forward pass: both heads and the open-set features of every (member, view, patch), in batches.

`score_members` is what `Ensemble.predict` runs on each chunk of patches: every D4 view of the chunk through
each member in one pass, the manipulated flag estimated from the auxiliary head where the caller left it open,
and only those rows scored again with the flag set. `heads` caches each member with its extra `features`
output (`with_features`), built once per member.
"""
from __future__ import annotations

import numpy as np

from camid.inference.tta import d4_views, fold_views


def with_features(model, heads: dict):
    """`model` with a third output, `features`: the backbone's average-pooled features, the input of the
    manipulation head (the same layers, so no extra pass). They come before the `manipulated` flag enters, so
    a photo's features, and its open-set score, do not depend on the flag: the training bank, the validation
    thresholds and a served answer compare like with like whether the flag was given, estimated or off. The
    model itself where it has no layer named "manipulation"."""
    if id(model) not in heads:
        import keras

        try:
            outputs = {"camera": model.get_layer("camera").output,
                       "manipulation": model.get_layer("manipulation").output,
                       "features": model.get_layer("manipulation").input}
            heads[id(model)] = keras.Model(model.input, outputs, name=f"{model.name}_with_features")
        except ValueError:
            heads[id(model)] = model
    return heads[id(model)]

def forward(model, views: np.ndarray, flags: np.ndarray, batch_size: int, heads: dict):
    """Both heads' outputs and the penultimate features (None without) for uint8 views, `batch_size` at a
    time (converted to float32 per batch only)."""
    camera, manipulation, features = [], [], []
    model = with_features(model, heads)
    for start in range(0, len(views), batch_size):
        out = model.predict_on_batch({"image": views[start:start + batch_size].astype("float32"),
                                      "manipulated": flags[start:start + batch_size].reshape(-1, 1).astype("float32")})
        camera.append(np.asarray(out["camera"], dtype=np.float64))
        manipulation.append(np.asarray(out["manipulation"], dtype=np.float64))
        if "features" in out:
            features.append(np.asarray(out["features"], dtype=np.float32))
    return (np.concatenate(camera), np.concatenate(manipulation),
            np.concatenate(features) if features else None)

def score_members(models: list, patches: np.ndarray, flags: np.ndarray, unknown: np.ndarray, views: tuple[int, ...],
                  batch_size: int, heads: dict):
    """(models, views, N, C) camera probabilities, (N, 9) manipulation probabilities, the estimated flags and
    (N, D) features of the first view (`openset.features_of`; None without; they do not depend on the flag)."""
    from camid.inference.openset import features_of

    n_views = len(views)
    stacked = d4_views(patches, views)
    camera, manip, feats = [], [], []
    for model in models:
        cam, aux, feat = forward(model, stacked, np.tile(flags, n_views), batch_size, heads)
        camera.append(fold_views(cam, n_views))
        manip.append(fold_views(aux, n_views))
        feats.append(None if feat is None else fold_views(feat, n_views)[0])
    features = None if any(f is None for f in feats) else features_of(feats)
    manipulation_probs = np.concatenate(manip).mean(axis=0)
    # The auxiliary head does not see the flag, so one pass is enough to estimate it; only the rows it
    # calls manipulated are scored again, with the flag set.
    estimated = unknown & (manipulation_probs[:, 0] < 0.5)
    if estimated.any():
        rows = np.flatnonzero(estimated)
        sub_views = d4_views(patches[rows], views)
        for m, model in enumerate(models):
            cam, _, _ = forward(model, sub_views, np.ones(len(sub_views), bool), batch_size, heads)
            camera[m][:, rows] = fold_views(cam, n_views)
    return np.stack(camera), manipulation_probs, flags | estimated, features
