"""The options a prediction takes, defined once: name, type, default, choices and what each means.

The served model's params (and its MLflow signature), `camid predict`'s flags and the evaluate stage's checks
all come from `OPTIONS`, so a default or a choice is changed here and nowhere else. Stage settings in
params.yaml (`evaluate.blend`, `evaluate.balance`) are checked against the same choices.
"""
from __future__ import annotations

from dataclasses import dataclass

from camid.errors import CamidError
from camid.inference.balancing import BALANCERS
from camid.inference.blending import BLENDS

MODEL_BLEND = "model"  # the blend the bundle's evaluation scored
BALANCE_CHOICES = ("none",) + BALANCERS
BLEND_CHOICES = (MODEL_BLEND,) + BLENDS
MAX_PATCHES = 1024
ON_ERROR_CHOICES = ("fail", "row")  # a bad row fails the request (serving's 400), or gets an error value


class OptionError(CamidError, ValueError):
    """A prediction option with a wrong value; the message says which values are allowed."""


@dataclass(frozen=True)
class Option:
    name: str
    kind: type  # bool, int or str
    default: object
    help: str
    choices: tuple = ()

    @property
    def mlflow_type(self) -> str:
        return {bool: "boolean", int: "long", str: "string"}[self.kind]

    def check(self, value):
        """`value` as this option's type, or an OptionError naming the allowed values. Strings such as "true",
        "0" or "12" (query strings, CSV, JSON written by hand) are read as the type they spell."""
        if self.kind is bool:
            if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
                value = value.strip().lower() in ("true", "1", "yes")
            if type(value).__name__ not in ("bool", "bool_"):
                raise OptionError(f"param {self.name}={value!r}; send true or false")
            return bool(value)
        if self.kind is int:
            if isinstance(value, str) and value.strip().isdigit():
                value = int(value)
            if type(value).__name__ in ("bool", "bool_") or not hasattr(value, "__index__"):
                raise OptionError(f"param {self.name}={value!r}; {self.help}")
            value = int(value)
            if self.name == "patches" and not 0 <= value <= MAX_PATCHES:
                raise OptionError(f"param patches={value!r}; send 0 (auto), 1 (the centre patch) or up to {MAX_PATCHES}")
            return value
        if value not in self.choices:
            raise OptionError(f"param {self.name}={value!r}; choose one of {', '.join(self.choices)}")
        return value


OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("tta", bool, True, "average the test-time views the model's evaluation chose (false: the identity only)"),
    Option("blend", str, MODEL_BLEND, f"how views and members are blended; {MODEL_BLEND}: the model's own",
           BLEND_CHOICES),
    Option("balance", str, "none", "balance answers to equal counts per camera in each unaltered/manipulated "
           "group (closed sets known to be balanced only)", BALANCE_CHOICES),
    Option("patches", int, 0, f"patches per photo on a grid: 0 auto (tiled without overlap), 1 the centre, "
           f"up to {MAX_PATCHES}"),
    Option("jpeg_tables", bool, True, "use the JPEG quantization tables as evidence where the model's evaluation "
           "kept them (false: pixels only)"),
    Option("open_set", bool, True, "answer `unknown` for a photo unlike every catalog camera: its features far "
           "from the training photos' (below the kNN threshold the model's evaluation fitted on validation; "
           "bundles without a feature bank: its calibrated top probability below that setting's threshold), or, "
           "where that validation allowed it, its JPEG tables seen in no training photo (false: always a catalog "
           "camera)"),
    Option("on_error", str, "fail", "fail: a bad row fails the whole request; row: that row gets an `error` "
           "value and the others are answered", ON_ERROR_CHOICES),
)}
DEFAULTS = {name: option.default for name, option in OPTIONS.items()}


def batch_options(patches: int = 0, **changes) -> dict:
    """The options a batch answer runs with (`camid predict`, `camid report`, `camid ui`): the served model's
    defaults with `patches` and `changes`, without the served model's own `on_error` (a batch gives a bad file a
    row of its own)."""
    unknown = sorted(set(changes) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s): {', '.join(unknown)}")
    return {name: value for name, value in {**DEFAULTS, "patches": patches, **changes}.items() if name != "on_error"}


def resolve(params: dict | None) -> dict:
    """Every option, the given ones checked and coerced, the rest at their default. None means the default."""
    given = {k: v for k, v in (params or {}).items() if v is not None}
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise OptionError(f"unknown param(s) {unknown}; known: {sorted(OPTIONS)}")
    return {name: option.check(given[name]) if name in given else option.default for name, option in OPTIONS.items()}


def blend_for(value: str) -> str | None:
    """The blend to pass to `Ensemble.predict_photos`: None for the model's own."""
    return None if value == MODEL_BLEND else value


def check_stage_choices(blend: str, balance: str) -> None:
    """The evaluate stage's `blend` (a real blend: it is what the bundle stores) and `balance`."""
    if blend not in BLENDS:
        raise OptionError(f"unknown blend {blend!r}; choose one of {', '.join(BLENDS)}")
    OPTIONS["balance"].check(balance)
