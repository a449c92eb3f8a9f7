"""Evidence from the JPEG encoder's settings: which cameras' firmware writes a photo's quantization tables.

A camera's firmware compresses with its own quantization tables and chroma sampling (one fixed set, or a
few it picks per scene); every device of a model runs the same firmware, so the tables carry over from the
devices training saw to devices it did not, and they often tell apart two models that share a sensor and differ
only in firmware (a Nikon D70 and D70s, the zoo's Aster-A1 and A1s), where pixels alone are weakest. A photo
re-saved by other software carries that software's tables instead, which no training photo has, so it says
nothing; the evidence is left out only where the caller says a photo is manipulated (and for the evaluation's
manipulated copies), not where the auxiliary head merely estimates so.

`TablePrior` counts, per camera, the table signatures (`camid.forensics.jpeg_quality.JpegHeader.
table_signature`; for bytes, `camid.forensics.inspect.header_facts`) of the training photos and turns a query's signature into a likelihood per camera,
P(signature | camera) with add-`alpha` smoothing over the signatures seen plus one for "any other". The
pixel probabilities are multiplied by it and renormalised (naive Bayes: the two kinds of evidence are close to
independent given the camera). A signature no training photo had says nothing: the probabilities are left as
they are. The evaluate stage scores the test set with and without it and keeps it only if it does not lower the
validation score; the bundle stores the counts (`jpeg_tables.json`).

Families. A photo whose exact tables no training photo had may still carry tables of a catalog camera's
*family* (`camid.forensics.jpeg_quality.same_family`: one base table at another quality scale): another quality
mode (Fine / Normal / Basic) of the same firmware, or a scene-adaptive quality the training photos did not
happen to reach. That is evidence for the cameras whose training photos had a family member: P(family | camera)
from the same smoothed counts, summed over the members (evidence FAMILY). `unseen` is kept for tables that no
catalog camera's family produces. Families are broad where firmware scales the IJG example tables (many makers
do): the family then says "not one of the catalog's other firmwares" rather than naming one camera, and the
pixels decide. The bundle keeps each seen signature's tables (`jpeg_tables.json` "quant"); a bundle without them
(written before families) answers exact matches only.

`TablePrior.matches` turns the counts into an answer an analyst reads (`camid inspect --model`): the catalog
cameras whose training photos carried a signature, most photos first. `TablePrior.from_model` reads the counts
of a bundle folder, a local pyfunc folder or an MLflow model URI, downloading `jpeg_tables.json` alone (never the
Keras members). Both are implemented in camid.forensics.inspect (`firmware_match`, `read_table_counts`):
the filter and split stages import that module, and their DVC dependencies must not grow to camid.inference.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from camid.core.fileio import write_json
from camid.forensics.jpeg_quality import TableSignature, family_members

FILE = "jpeg_tables.json"  # camid.forensics.inspect.TABLES_FILE names it too (tests check they agree)
# What the tables said of an answer (`TablePrior.evidence`, the served `tables_evidence` column): USED, a training
# photo had the signature and the evidence entered the answer; UNSEEN, a JPEG taken as a camera original whose
# tables no training photo had (another camera's firmware, or a re-save); NONE, not applicable (no JPEG, a damaged
# header, a caller's manipulated flag, `jpeg_tables: false`, a bundle whose evaluation left the tables out).
USED, UNSEEN, NONE = "used", "unseen", "none"
# FAMILY: no training photo had the exact tables, but a catalog camera's training photos had tables of their
# family (the same base table at another quality); the family's evidence entered the answer.
FAMILY = "family"


def entered(evidence) -> np.ndarray:
    """(N,) bool: rows whose table evidence entered the answer (USED or FAMILY)."""
    evidence = np.asarray(evidence, dtype=object)
    return (evidence == USED) | (evidence == FAMILY)


def signature_of_file(path: str | Path) -> str | None:
    """The table signature of a JPEG file (header only); None for anything else or a damaged header."""
    from camid.forensics.inspect import inspect_file

    return inspect_file(path, hashes=False)["jpeg_tables"]


@dataclass
class TablePrior:
    counts: dict[str, list[int]]   # signature -> photos per camera (catalog order)
    labels: list[str]
    alpha: float = 0.5
    quant: dict[str, dict] = field(default_factory=dict)  # signature -> its tables (TableSignature.quant())

    @classmethod
    def fit(cls, signatures, camera_index, labels: list[str], alpha: float = 0.5) -> "TablePrior":
        """Count the training photos' signatures (None: not a JPEG, left out) per camera index, keeping the tables
        of each (`TableSignature`) for the family test."""
        counts: dict[str, list[int]] = {}
        quant: dict[str, dict] = {}
        for sig, cam in zip(signatures, camera_index):
            if sig is not None:
                counts.setdefault(str(sig), [0] * len(labels))[int(cam)] += 1
                if isinstance(sig, TableSignature):
                    quant.setdefault(str(sig), sig.quant())
        return cls(dict(sorted(counts.items())), list(labels), alpha, dict(sorted(quant.items())))

    def __post_init__(self):
        table = np.array(list(self.counts.values()), dtype=np.float64).reshape(len(self.counts), len(self.labels))
        self._table = table
        self._outcomes = len(self.counts) + 1  # every seen signature, plus "some other one"
        self._likelihood = (table + self.alpha) / (table.sum(axis=0) + self.alpha * self._outcomes)
        self._row = {sig: k for k, sig in enumerate(self.counts)}
        self._members = [TableSignature.from_quant(sig, q) for sig, q in self.quant.items() if sig in self._row]
        self._member_of = {str(m): m for m in self._members}
        self._family_cache: dict[str, list[str]] = {}

    def family(self, signature: str | None) -> list[str]:
        """The seen signatures of `signature`'s family (`same_family`), other than itself; [] for a plain string
        (no tables), a bundle without tables, or tables of no seen family."""
        if signature is None or not isinstance(signature, TableSignature) or not self._members:
            return []
        key = str(signature)
        if key not in self._family_cache:
            fits = family_members(signature, self._members)
            self._family_cache[key] = [str(m) for m, ok in zip(self._members, fits) if ok and str(m) != key]
        return self._family_cache[key]

    def seen_family(self, key: str) -> list[str]:
        """`family` of the seen signature `key` (a `counts` key): the other seen signatures of its family; [] where
        its tables were not kept (a plain string)."""
        member = self._member_of.get(key)
        return self.family(member) if member is not None else []

    def _family_likelihood(self, signature) -> np.ndarray | None:
        members = self.family(signature)
        if not members:
            return None
        counts = self._table[[self._row[m] for m in members]].sum(axis=0)
        return (counts + self.alpha) / (self._table.sum(axis=0) + self.alpha * self._outcomes)

    def likelihood(self, signature: str | None) -> np.ndarray | None:
        """(C,) P(signature | camera), for a signature no training photo had P(its family | camera); None when
        the tables tell nothing (unseen and of no seen family, or no JPEG)."""
        if signature is None:
            return None
        row = self._row.get(str(signature))
        return self._likelihood[row] if row is not None else self._family_likelihood(signature)

    def evidence(self, signatures, usable) -> np.ndarray:
        """(N,) USED, FAMILY, UNSEEN or NONE per row: `usable` rows with a signature are USED where a training
        photo had it, FAMILY where training photos had tables of its family (the rows `apply` changes: `entered`),
        UNSEEN where neither; the others NONE."""
        def one(sig, ok):
            if not ok or sig is None:
                return NONE
            if str(sig) in self._row:
                return USED
            return FAMILY if self.family(sig) else UNSEEN
        return np.array([one(sig, ok) for sig, ok in zip(signatures, usable)], dtype=object)

    def apply(self, probs: np.ndarray, signatures, usable) -> np.ndarray:
        """(N, C) probabilities times each row's likelihood, renormalised, where `usable` and the tables (or their
        family) are known (`entered`); other rows unchanged."""
        probs = np.array(probs, dtype=np.float64)
        for row in np.flatnonzero(entered(self.evidence(signatures, usable))):
            posterior = probs[row] * self.likelihood(signatures[row])
            probs[row] = posterior / posterior.sum()
        return probs

    def matches(self, signature: str | None) -> list[dict] | None:
        """The catalog cameras whose training photos carried exactly `signature`, most photos first (catalog
        order among ties): [{"camera", "photos", "share"}], share = that camera's part of those photos. [] when
        no training photo had it (re-saved by other software, or a camera outside the catalog); None for no
        signature (not a JPEG, or a damaged header). One implementation, camid.forensics.inspect.firmware_match,
        shared with `camid inspect --model`."""
        from camid.forensics.inspect import firmware_match

        return firmware_match(self.counts, self.labels, signature)

    def family_matches(self, signature: str | None) -> list[dict] | None:
        """The catalog cameras whose training photos carried tables of `signature`'s family at another quality
        (`family`), as `matches` lists them; [] for none, None for no signature. camid.forensics.inspect's
        `firmware_family`, shared with `camid inspect --model`."""
        from camid.forensics.inspect import firmware_family

        return firmware_family(self.counts, self.labels, self.quant, signature)

    def write(self, bundle: Path) -> None:
        write_json(Path(bundle) / FILE, {"labels": self.labels, "alpha": self.alpha, "counts": self.counts,
                                         "quant": self.quant})

    @classmethod
    def read(cls, bundle: Path) -> "TablePrior | None":
        path = Path(bundle) / FILE
        if not path.is_file():
            return None
        spec = json.loads(path.read_text())
        return cls(spec["counts"], spec["labels"], spec["alpha"], spec.get("quant", {}))

    @classmethod
    def from_model(cls, model: str | Path) -> "TablePrior":
        """The counts of a bundle folder, a local pyfunc folder or an MLflow model URI (models:/name@alias,
        models:/name/version, runs:/<run>/model), reading `jpeg_tables.json` alone (no Keras model is loaded);
        CamidError saying what to check when it cannot. The reading is camid.forensics.inspect's
        (`read_table_counts`), which `camid inspect --model` uses without importing this module."""
        from camid.forensics.inspect import read_table_counts

        spec = read_table_counts(model)
        return cls(spec["counts"], spec["labels"], spec["alpha"], spec.get("quant", {}))
