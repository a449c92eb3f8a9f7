"""Other open-set scores on the same features: does a different score tell a catalog model's other devices from
unknown models better than camid's kNN score does?

Reads what `python bench/device_gap.py --cameras ... --save FILE.npz` wrote (the bundle's bank of training-photo
features with their cameras, and the pixel features and pixel-only closest camera of the catalog models' other
devices and of the unknown models' photos) and prints, for each score of a photo against its closest camera, the
AUROC of other devices (known: should score high) against unknown models, and the share of unknown models a cut
accepting 0.90 of the other devices would reject (an oracle cut, for comparing scores only):

- kNN cosine to the k-th nearest training photo of the camera, k = 1, 3, 5 (camid's score: k = 5);
- cosine to the camera's centroid (the unit mean of its training photos);
- Mahalanobis distance to the camera's mean, with a shared within-camera covariance shrunk towards its mean
  variance (`--shrink`: few photos per camera against 128 dimensions);
- the kNN score over the whole bank (any camera);
- the kNN score relative to the camera's own held-out photos (log of the distance over their median distance).

    python bench/device_gap.py --cameras Aster-A1,Aster-A1s,Boreal-B7,Corvid-C3,Dune-D5,Ember-E2,Gale-G4,Halo-H8 \
        --save /tmp/dg8.npz
    python bench/open_set_scores.py /tmp/dg8.npz
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from camid.inference.openset import MIN_DISTANCE, auroc, camera_knn_score, knn_score, unit  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("features", type=Path, help="the .npz that bench/device_gap.py --save wrote")
    parser.add_argument("--shrink", type=float, default=0.5, help="Mahalanobis: the covariance's shrinkage towards "
                        "its mean variance, in [0, 1]")
    args = parser.parse_args(argv)
    if not args.features.is_file():
        parser.error(f"{args.features} does not exist: write it with bench/device_gap.py --cameras ... --save FILE")
    data = np.load(args.features)
    if "unknown_models_features" not in data.files:
        parser.error(f"{args.features} has no unknown models: run bench/device_gap.py with --cameras")
    labels = list(data["labels"])
    bank, bank_labels = data["bank"], data["bank_labels"]
    known, known_camera = data["questioned_features"], np.array([labels.index(c) for c in data["questioned_closest"]])
    unknown = data["unknown_models_features"]
    unknown_camera = np.array([labels.index(c) for c in data["unknown_models_closest"]])
    held, held_camera = data["reference_features"], np.array([labels.index(c) for c in data["reference_labels"]])

    def knn(k):
        return lambda f, c: camera_knn_score(f, c, bank, bank_labels, k)

    centroids = unit(np.stack([bank[bank_labels == c].mean(0) for c in range(len(labels))]))
    means = np.stack([bank[bank_labels == c].mean(0) for c in range(len(labels))])
    within = np.concatenate([bank[bank_labels == c] - means[c] for c in range(len(labels))])
    cov = np.cov(within, rowvar=False)
    cov = (1 - args.shrink) * cov + args.shrink * np.trace(cov) / len(cov) * np.eye(len(cov))
    precision = np.linalg.inv(cov)

    def mahalanobis(f, c):
        diff = f - means[c]
        return -np.einsum("ij,jk,ik->i", diff, precision, diff)

    def relative(f, c):
        out = np.empty(len(f))
        for camera in np.unique(c):
            own = np.median(1 - camera_knn_score(held[held_camera == camera],
                                                 np.full(int((held_camera == camera).sum()), camera), bank, bank_labels))
            rows = c == camera
            distance = 1 - camera_knn_score(f[rows], c[rows], bank, bank_labels)
            out[rows] = -np.log(np.maximum(distance, MIN_DISTANCE) / max(own, MIN_DISTANCE))
        return out

    scores = {"kNN, k = 1": knn(1), "kNN, k = 3": knn(3), "kNN, k = 5 (camid)": knn(5),
              "centroid cosine": lambda f, c: np.sum(f * centroids[c], axis=1),
              f"Mahalanobis (shrink {args.shrink})": mahalanobis,
              "kNN over the whole bank": lambda f, c: knn_score(f, bank),
              "kNN relative to own held-out": relative}
    print(f"{len(labels)} catalog cameras; {len(known)} photos of their other devices, {len(unknown)} of unknown "
          f"models; features {bank.shape[1]}-d, {len(bank)} training photos")
    for name, score in scores.items():
        a, b = score(known, known_camera), score(unknown, unknown_camera)
        cut = np.quantile(a, 0.10)
        print(f"  {name:34s} AUROC {auroc(a, b):.3f}; unknown models rejected at the cut accepting 0.90 of the "
              f"other devices: {np.mean(b < cut):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
