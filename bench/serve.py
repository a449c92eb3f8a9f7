"""Serving throughput of the registered model behind the real `mlflow models serve`, and why TTA is batched.

1. HTTP: N concurrent clients (threads, one requests.Session each) share a fixed count of requests, each a
   `dataframe_split` of B real photos (base64 JPEG), against `mlflow models serve` on loopback; printed per
   model: requests/s, images/s, p50/p99 latency and errors. Models: one smallcnn and an ensemble of two
   (smallcnn trained with two seeds), both with test-time augmentation (the D4 views each bundle's evaluation
   chose, named in its row), registered
   from a tiny virtual zoo this script builds in a temporary folder; or the one given by --model-uri.
2. In-process: `Ensemble.predict` (all 8 views of the batch in one forward pass per model) against a naive
   loop that calls `model.predict` once per view per image, on the same patches; same probabilities, ratio of
   the times. Target: batched at least 4x faster.

    python bench/serve.py [--clients 4] [--requests 32] [--batch 8] [--model-uri models:/camid@champion]
"""
from __future__ import annotations

import argparse
import base64
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]

from camid.serving.server import LocalServer
from camid.tiny import build_tiny_model, inside

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def register_pair(model) -> dict[str, str]:
    """Register the first member alone and the whole bundle, each under its own name."""
    from camid.inference.ensemble import Ensemble
    from camid.stages.register import register

    single = Ensemble.write_bundle(model.members[:1], model.root / "single")
    uris = {}

    def views(bundle) -> str:  # the views the bundle serves with tta on (its evaluation's choice)
        count = len(Ensemble.load(bundle).views)
        return f"{count} view{'s' if count != 1 else ''}"

    with inside(model.root, MLFLOW_TRACKING_URI=model.tracking_uri, MLFLOW_EXPERIMENT_NAME="camid-bench"):
        for label, name, bundle in ((f"1 model x {views(single)}", "camid-single", single),
                                    (f"ensemble of {len(model.members)} x {views(model.bundle)}", "camid-ensemble",
                                     model.bundle)):
            record = register(bundle, {"weighted_accuracy": model.weighted_accuracy}, name, "champion")
            uris[label] = record["alias_uri"]
    return uris


def hammer(url: str, payload: dict, clients: int, total: int, time_limit: float) -> dict:
    """`clients` threads send `total` requests between them (stopping early at `time_limit` seconds)."""
    lock, sent, latencies, errors = threading.Lock(), [0], [], Counter()
    deadline = time.monotonic() + time_limit

    def client() -> None:
        with requests.Session() as session:
            while time.monotonic() < deadline:
                with lock:
                    if sent[0] >= total:
                        return
                    sent[0] += 1
                start = time.perf_counter()
                try:
                    response = session.post(f"{url}/invocations", json=payload, timeout=time_limit)
                    error = None if response.status_code == 200 else f"HTTP {response.status_code}"
                except requests.RequestException as exc:
                    error = type(exc).__name__
                with lock:
                    if error:
                        errors[error] += 1
                    else:
                        latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    p50, p99 = np.percentile(latencies, [50, 99]) if latencies else (float("nan"), float("nan"))
    return {"done": len(latencies), "elapsed": elapsed, "rps": len(latencies) / elapsed, "p50": p50, "p99": p99,
            "errors": sum(errors.values()), "error_kinds": dict(errors)}


def naive_predict(ensemble, patches: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """What batching replaces: one `model.predict` per D4 view per image, then the same blend and the bundle's
    calibration (Ensemble.predict answers calibrated patch probabilities: its fitted temperature, 1 if none)."""
    from camid.inference.blending import blend
    from camid.inference.tta import D4, d4_view

    probs = np.zeros((len(ensemble.models), len(D4), len(patches), len(ensemble.labels)))
    for m, model in enumerate(ensemble.models):
        for i in range(len(patches)):
            for v in range(len(D4)):
                inputs = {"image": d4_view(patches[i:i + 1], v).astype("float32"),
                          "manipulated": np.array([[flags[i]]], dtype="float32")}
                probs[m, v, i] = model.predict(inputs, verbose=0)["camera"][0]
    return ensemble.calibrate(blend(probs.reshape(-1, len(patches), len(ensemble.labels)), "mean_square"), "patch")


def batched_vs_naive(ensemble, patches: np.ndarray, repeats: int = 3) -> dict:
    flags = np.arange(len(patches)) % 2 == 1  # given flags: no second pass for estimated ones
    ensemble.predict(patches[:2], flags[:2])  # warm-up: trace the graph once
    batched = []
    for _ in range(repeats):
        start = time.perf_counter()
        pred = ensemble.predict(patches, flags, views=range(8), blend="mean_square")
        batched.append(time.perf_counter() - start)
    start = time.perf_counter()
    naive = naive_predict(ensemble, patches, flags)
    naive_s = time.perf_counter() - start
    return {"batched": min(batched), "naive": naive_s, "ratio": naive_s / min(batched),
            "max_diff": float(np.abs(naive - pred.probs).max())}


def photo_payload(paths: list[Path], batch: int, patches: int) -> dict:
    rows = [[base64.b64encode(p.read_bytes()).decode(), i % 2 == 1] for i, p in enumerate(paths[:batch])]
    return {"dataframe_split": {"columns": ["image", "manipulated"], "data": rows}, "params": {"patches": patches}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=1,
                        help="the served `patches` param: 1 the centre patch, 0 auto (the whole photo tiled)")
    parser.add_argument("--model-uri", help="serve this model instead of building and registering tiny ones "
                                            "(MLFLOW_TRACKING_URI must point at its store)")
    parser.add_argument("--images", type=Path, help="folder of photos to send (default: the tiny zoo's held-out ones)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32, help="requests per model, shared by the clients")
    parser.add_argument("--batch", type=int, default=8, help="images per request")
    parser.add_argument("--time-limit", type=float, default=60, help="seconds per model at most")
    parser.add_argument("--inprocess-images", type=int, default=16, help="images for batched vs naive")
    args = parser.parse_args(argv)

    from camid.core.imageio import decode_image
    from camid.core.patches import centre_crop
    from camid.core.imageio import list_images
    from camid.inference.ensemble import load_ensemble

    with tempfile.TemporaryDirectory(prefix="camid-bench-serve-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        if args.model_uri:
            targets, env, bundle = {args.model_uri: args.model_uri}, dict(os.environ), args.model_uri
            photos = list_images([args.images]) if args.images else None
        else:
            model = build_tiny_model(tmp / "zoo", seeds=(1, 2), register=False)
            targets, env = register_pair(model), model.env()
            bundle = str(model.root / "single")  # the single-member bundle register_pair wrote
            photos = list_images([args.images]) if args.images else [Path(p) for p in model.test.path]
        if photos is None:
            import dataclasses

            from camid.config import load_params
            from camid.data.synth import synthesize

            params = load_params(ROOT / "params.yaml")
            synthesize(tmp / "photos", params.catalog, dataclasses.replace(params.synth, images_per_device=1,
                                                                           bad_fraction=0.0), progress=False)
            photos = list_images([tmp / "photos"])
        print(f"models ready in {time.perf_counter() - started:.0f} s; starting {len(targets)} server(s)", flush=True)

        servers = {label: LocalServer(uri, tmp / f"serve-{i}.log", env=env, workers=1, timeout_s=300)
                   for i, (label, uri) in enumerate(targets.items())}
        results, bad_request = {}, None
        try:
            for server in servers.values():
                server.start(startup_s=240)
            payload = photo_payload(photos, args.batch, args.patches)
            for label, server in servers.items():
                warm = requests.post(f"{server.url}/invocations", json=payload, timeout=300)
                if warm.status_code != 200:
                    raise SystemExit(f"{label}: warm-up request failed: {warm.status_code} {warm.text[:500]}")
                results[label] = hammer(server.url, payload, args.clients, args.requests, args.time_limit)
            first = next(iter(servers.values()))
            bad = {"dataframe_records": [{"image": payload["dataframe_split"]["data"][0][0]}, {"image": "%%%"}]}
            r = requests.post(f"{first.url}/invocations", json=bad, timeout=60)
            bad_request = f"HTTP {r.status_code}: {r.json().get('message', '').split('Error:')[-1].strip()[:120]}"
        finally:
            for server in servers.values():
                server.stop()

        ensemble = load_ensemble(bundle)
        pixels = [decode_image(p.read_bytes()) for p in photos]
        patches = np.stack([centre_crop(pixels[i % len(pixels)], ensemble.patch) for i in range(args.inprocess_images)])
        compare = batched_vs_naive(ensemble, patches)

    print(f"\ncamid serve bench: {args.clients} clients, {args.requests} requests of {args.batch} photos each, "
          f"tta on (the bundle's views), patches {args.patches or 'auto'}, {os.cpu_count()} CPU cores, loopback")
    print(f"{'model':<28}{'req/s':>8}{'img/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for label, r in results.items():
        note = f"  {r['error_kinds']}" if r["errors"] else ""
        if r["done"] + r["errors"] < args.requests:
            note += f"  (stopped after {r['done'] + r['errors']} by --time-limit)"
        print(f"{label:<28}{r['rps']:>8.2f}{r['rps'] * args.batch:>8.1f}{r['p50'] * 1000:>9.0f}"
              f"{r['p99'] * 1000:>9.0f}{r['errors']:>8}{note}")
    print(f"invalid base64 in row 1 -> {bad_request}")
    print(f"\nin-process, {'+'.join(ensemble.names)} x 8 views, {len(patches)} patches of {ensemble.patch} px:")
    print(f"  batched (Ensemble.predict, one forward pass)  {compare['batched']:8.2f} s")
    print(f"  naive (model.predict per view per image)      {compare['naive']:8.2f} s")
    print(f"  batched is {compare['ratio']:.1f}x faster (target >= 4x); max probability difference "
          f"{compare['max_diff']:.1e}")
    return 0 if compare["ratio"] >= 4 and not any(r["errors"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
