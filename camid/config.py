"""Typed loader for params.yaml: the one source of truth for the camera catalog and every default.

Each section of params.yaml maps onto a frozen dataclass below. Stages read only the section they need, so
DVC can re-run only what a changed key affects.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAMLError

from camid.errors import CamidError

# camid reads and writes YAML with one library, ruamel.yaml: YAML 1.2 (where `1e-4` is a number) and, for
# rewriting params.yaml (camid.tools.profile), a round trip that keeps comments.

PARAMS_FILE = "params.yaml"


class ConfigError(CamidError, ValueError):
    """params.yaml is missing, malformed, or names something unknown."""


@dataclass(frozen=True)
class Camera:
    """A catalog camera. `background: true` marks a class of *other* cameras' photos (known unknowns): it is trained
    like any camera, so that the features learn what sets the catalog's cameras apart from cameras in general
    rather than only from each other, but it is never an answer: a photo whose pixels the network puts with it is
    answered `unknown` (camid.inference.ensemble, `Ensemble.background`)."""
    label: str
    make: str
    models: tuple[str, ...]          # EXIF Model glob patterns (fnmatch, case-sensitive)
    sizes: tuple[tuple[int, int], ...]  # native (h, w); either orientation is accepted
    rot90: bool                      # photos come in both orientations, so rot90 is a valid augmentation
    search: str = ""                 # free text for photo-site searches
    background: bool = False         # photos of other cameras: trained as a class, never an answer

    def matches_model(self, model: str | None) -> bool:
        model = (model or "").strip()
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    def is_native_size(self, height: int, width: int) -> bool:
        return any((height, width) in ((h, w), (w, h)) for h, w in self.sizes)


@dataclass(frozen=True)
class Catalog:
    name: str
    cameras: tuple[Camera, ...]

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.cameras]

    def __len__(self) -> int:
        return len(self.cameras)

    def index(self, label: str) -> int:
        try:
            return self.labels.index(label)
        except ValueError:
            raise ConfigError(
                f"unknown camera label {label!r}; the {self.name!r} catalog has: {', '.join(self.labels)}"
            ) from None

    def get(self, label: str) -> Camera:
        return self.cameras[self.index(label)]

    def by_model(self, model: str | None) -> Camera | None:
        return next((c for c in self.cameras if c.matches_model(model)), None)


@dataclass(frozen=True)
class FlickrParams:
    api_url: str = "https://api.flickr.com/services/rest/"
    max_per_camera: int = 3000
    per_page: int = 250
    requests_per_second: float = 1.0
    check_exif: bool = False
    timeout_s: float = 30
    retries: int = 5
    backoff_s: float = 1.0           # first retry wait; doubles on each further retry (Retry-After wins when sent)
    image_host: str = ""             # replaces the scheme and host of url_o when set (tests point it at a fake server)


@dataclass(frozen=True)
class AcquireParams:
    source: str = "synthetic"
    folder: str = ""
    flickr: FlickrParams = field(default_factory=FlickrParams)


@dataclass(frozen=True)
class SynthParams:
    seed: int = 2018
    devices_per_model: int = 4
    images_per_device: int = 16
    bad_fraction: float = 0.15
    pipelines: dict = field(default_factory=dict)


@dataclass(frozen=True)
class FilterParams:
    min_quality: int = 94
    phash_max_distance: int = 4
    max_pixels: int = 100_000_000
    editors: tuple[str, ...] = ()


@dataclass(frozen=True)
class SplitParams:
    seed: int = 7
    val_fraction: float = 0.25
    test_fraction: float = 0.25
    photo_fraction: float = 0.15     # cameras of fewer than 3 devices: photos held out for val and for test, each
    session_validation: bool = False  # such a camera's photos of several sessions: validation whole sessions


@dataclass(frozen=True)
class TrainParams:
    archs: tuple[str, ...] = ("smallcnn",)
    patch: int = 64
    weights: str = "none"
    epochs: int = 14
    steps_per_epoch: int = 60
    batch_size: int = 32
    learning_rate: float = 1e-3
    dense: tuple[int, ...] = (128,)
    dropout: tuple[float, ...] = (0.3,)
    manipulation_prob: float = 0.5
    crops_per_decode: int = 8
    cfa_flips: bool = False          # the diagonal flip that keeps a camera's CFA layout, where its photos show it
    aux_weight: float = 0.2
    lr_factor: float = 0.5
    lr_patience: int = 3
    early_stopping_patience: int = 12
    checkpoint: str = "within_noise"  # within_noise | best: which epoch's weights training keeps
    precise_bn: int = 16             # batches of training patches BatchNormalization's statistics are re-estimated
                                     # on at every epoch's end (0: Keras' moving statistics); camid.models.callbacks
    seed: int = 1


@dataclass(frozen=True)
class TuneParams:
    algorithm: str = "hyperband"
    max_trials: int = 4
    epochs: int = 3


@dataclass(frozen=True)
class EvaluateParams:
    tta: bool = True
    jpeg_tables: bool = True
    blend: str = "mean_square"
    balance: str = "none"
    open_set_accept: float = 0.95    # share of validation photos the open-set threshold accepts (the rest: unknown)
    single_device_reach: float = 0.7  # a one-reference-device camera's threshold: how far, on a log scale of distance,
                                      # from its held-out photos' median (0) to the other cameras' (1) (openset)
    unseen_tables_reach: float = 0.5  # the same camera's threshold for a photo whose JPEG tables are unseen: the
                                      # tables then raise the pixels' bar instead of deciding `unknown` alone


@dataclass(frozen=True)
class RegisterParams:
    model_name: str = "camid"
    alias: str = "champion"


@dataclass(frozen=True)
class Params:
    catalog: Catalog
    synth: SynthParams
    acquire: AcquireParams
    filter: FilterParams
    split: SplitParams
    train: TrainParams
    tune: TuneParams
    evaluate: EvaluateParams
    register: RegisterParams
    profiles: dict
    path: Path


_SCALARS = {"int": int, "float": float, "bool": bool, "str": str}


def _coerce(where: str, kind: str, value):
    """`value` as the field type `kind` (an annotation string), or a ConfigError that names the key.

    A float may be written like `1e-4`, which YAML reads as a string (it wants `1.0e-4`): that is accepted.
    Nothing else is converted: a wrong type is an error, not a guess."""
    if kind.startswith("tuple["):
        item = kind[len("tuple["):].split(",")[0].strip()
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(f"{where}[{i}]", item, v) for i, v in enumerate(value))
    expected = _SCALARS.get(kind)
    if expected is None:
        return value
    if expected is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"params {where} is {value!r} ({type(value).__name__}); it must be {kind}")


def _build(cls, section: str, raw: Any):
    """Instantiate a section dataclass: values checked against the field types, lists made tuples, unknown keys
    rejected."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"params section {section!r} must be a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) in params section {section!r}: {', '.join(unknown)}")
    values = {}
    for key, value in raw.items():
        if key == "flickr":
            value = _build(FlickrParams, f"{section}.flickr", value)
        else:
            value = _coerce(f"{section}.{key}", str(known[key].type), value)
        values[key] = value
    return cls(**values)


def _catalog(raw: dict) -> Catalog:
    active = raw.get("active", "virtual")
    entries = raw.get(active)
    if not entries:
        choices = [k for k in raw if k != "active"]
        raise ConfigError(f"catalog.active is {active!r} but params.yaml has no such catalog; choose one of {choices}")
    cameras = []
    for entry in entries:
        try:
            cameras.append(Camera(
                label=entry["label"], make=entry.get("make", ""), models=tuple(entry["models"]),
                sizes=tuple((int(h), int(w)) for h, w in entry["sizes"]), rot90=bool(entry.get("rot90", False)),
                search=entry.get("search", entry["label"]), background=bool(entry.get("background", False)),
            ))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"catalog {active!r}: malformed camera entry {entry!r}: {exc}") from None
    labels = [c.label for c in cameras]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"catalog {active!r} has duplicate labels")
    if all(c.background for c in cameras):
        raise ConfigError(f"catalog {active!r} has only background cameras (`background: true`): they are never an "
                          "answer, so at least one camera must be a catalog camera of its own")
    return Catalog(active, tuple(cameras))


def load_raw(path: str | os.PathLike | None = None) -> dict:
    path = Path(path or os.environ.get("CAMID_PARAMS", PARAMS_FILE))
    if not path.is_file():
        raise ConfigError(f"{path} not found: run camid from the project root or set CAMID_PARAMS to a params file")
    try:
        raw = read_yaml(path.read_text()) or {}
    except YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return raw


def read_yaml(text: str):
    """Plain Python data (dicts, lists, scalars) from YAML text."""
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(text)


def dump_yaml(data) -> str:
    """Block-style YAML text for plain Python data, keys in the order given."""
    import io

    from ruamel.yaml import YAML

    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    buf = io.StringIO()
    yaml.dump(data, buf)
    return buf.getvalue()


def load_params(path: str | os.PathLike | None = None) -> Params:
    """Load params.yaml (or $CAMID_PARAMS) into typed sections."""
    raw = load_raw(path)
    if raw.get("prepare"):
        raise ConfigError("params.yaml has a `prepare` block (crops_per_image, shard_size, seed): the prepare stage "
                          "no longer caches crops, training cuts them from the photos as it decodes them. Delete "
                          "the block; train.crops_per_decode sets how many patches each decode yields")
    return Params(
        catalog=_catalog(raw.get("catalog") or {}),
        synth=_build(SynthParams, "synth", raw.get("synth")),
        acquire=_build(AcquireParams, "acquire", raw.get("acquire")),
        filter=_build(FilterParams, "filter", raw.get("filter")),
        split=_build(SplitParams, "split", raw.get("split")),
        train=_build(TrainParams, "train", raw.get("train")),
        tune=_build(TuneParams, "tune", raw.get("tune")),
        evaluate=_build(EvaluateParams, "evaluate", raw.get("evaluate")),
        register=_build(RegisterParams, "register", raw.get("register")),
        profiles=raw.get("profiles") or {},
        path=Path(path or os.environ.get("CAMID_PARAMS", PARAMS_FILE)),
    )


def optional(kind=str):
    """An argparse type where an empty string means "not given, keep params.yaml's value" (MLproject passes ''
    for an entry-point parameter left unset), so params.yaml stays the one place every default is defined."""

    def convert(text: str):
        return None if text.strip() == "" else kind(text)

    convert.__name__ = getattr(kind, "__name__", "value")
    return convert
