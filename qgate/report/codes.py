"""Coded concepts used in qgate's DICOM outputs.

Standard codes (DCM, SCT, UCUM) are used where one fits. Concepts without a standard code
live in the private coding scheme ``99QGATE``, which every qgate object declares in its
Coding Scheme Identification Sequence (:func:`coding_scheme_identification`).

Scorer outputs need no code change to be reported: :func:`output_concept` derives a
``99QGATE`` concept from the output name, and :func:`unit_code` reads the output's unit as
a UCUM expression (with aliases such as ``"HU"``). A scorer may register a better concept
name, or a standard code, for an output at import time with :func:`register_output_concept`.
"""

from __future__ import annotations

import re

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

#: Designator of qgate's private coding scheme ("99" prefix: local, per PS3.16 8.2).
SCHEME = "99QGATE"
SCHEME_NAME = "qgate quality gate concepts"

# --- document-level concepts -------------------------------------------------------------

#: Title of the SR (CID 7021 is extensible; this is the generic measurement report title).
REPORT_TITLE = codes.cid7021.ImagingMeasurementReport
#: Procedure reported (CID 100).
PROCEDURE_CT = codes.cid100.CTUnspecifiedBodyRegion
#: Root-level container for the gate's conclusions (TID 1500 row 12).
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
#: Finding type of each scorer's measurement group.
SERIES_QUALITY = codes.DCM.ImagingSeriesQuality

GATE_DECISION = Code("GATEDEC", SCHEME, "Quality gate decision")
DECISION_PASS = Code("PASS", SCHEME, "Passed quality gate")
DECISION_FLAG = Code("FLAG", SCHEME, "Flagged for review by quality gate")
GATE_REASON = Code("GATERSN", SCHEME, "Quality gate reason")
REPORT_GENERATION = Code("GENERATION", SCHEME, "Quality report generation")
SUPERSEDES = Code("SUPERSEDES", SCHEME, "Supersedes earlier quality report")
#: A scorer or report object left out of this report (one TEXT item each, with the reason).
PART_SKIPPED = Code("SKIPPED", SCHEME, "Part of quality report skipped")

#: Units accepted by :func:`unit_code` besides plain UCUM expressions.
_UNIT_ALIASES: dict[str, Code] = {
    "hu": codes.UCUM.HounsfieldUnit,
    "[hnsf'u]": codes.UCUM.HounsfieldUnit,
    "1": codes.UCUM.NoUnits,
    "": codes.UCUM.NoUnits,
    "none": codes.UCUM.NoUnits,
    "unitless": codes.UCUM.NoUnits,
    "%": codes.UCUM.Percent,
    "mm": codes.UCUM.Millimeter,
    "db": codes.UCUM.Decibel,
    "s": codes.UCUM.Second,
    "mgy": Code("mGy", "UCUM", "mGy"),
    "{ratio}": codes.UCUM.Ratio,
}

# Output name -> concept name; the import-time registry of better names.
_OUTPUT_CONCEPTS: dict[str, Code] = {}


def register_output_concept(output: str, concept: Code) -> None:
    """Use ``concept`` as the SR concept name of every scorer output called ``output``.

    Parameters
    ----------
    output: str
        Output name as it appears in ``ScoreOutput.series`` (e.g. ``"noise_sigma_hu"``).
    concept: pydicom.sr.coding.Code
        Concept name to use, standard or ``99QGATE``.

    Raises
    ------
    TypeError
        When ``concept`` is not a Code.
    ValueError
        When ``output`` is already registered with a different concept.
    """
    if not isinstance(concept, Code):
        raise TypeError('Argument "concept" must be a pydicom.sr.coding.Code.')
    known = _OUTPUT_CONCEPTS.get(output)
    if known is not None and known != concept:
        raise ValueError(f"output {output!r} is already registered as {known}")
    _OUTPUT_CONCEPTS[output] = concept


def _humanise(name: str) -> str:
    words = re.sub(r"[_\-.]+", " ", name).strip()
    words = re.sub(r"\bhu\b", "HU", words, flags=re.IGNORECASE)
    words = re.sub(r"\bsnr\b", "SNR", words, flags=re.IGNORECASE)
    return (words[:1].upper() + words[1:])[:64] or "Output"


def _private_value(text: str) -> str:
    """A code value for the private scheme: no backslash or control characters."""
    value = re.sub(r"[\\\x00-\x1f]", "_", text).strip()
    if not value:
        raise ValueError("an empty string cannot be a code value")
    return value


def output_concept(output: str) -> Code:
    """Concept name of a scorer output: the registered one, else a ``99QGATE`` code.

    Parameters
    ----------
    output: str
        Output name, e.g. ``"noise_sigma_hu"``.

    Returns
    -------
    pydicom.sr.coding.Code
        Concept name for NUM or CODE content items.
    """
    known = _OUTPUT_CONCEPTS.get(output)
    if known is not None:
        return known
    return Code(_private_value(output), SCHEME, _humanise(output))


def label_code(label: str) -> Code:
    """A ``99QGATE`` coded value for a class label output (e.g. ``"low"`` dose)."""
    return Code(_private_value(label), SCHEME, label.strip()[:64])


def unit_code(unit: str) -> Code:
    """The UCUM code for a unit string.

    Parameters
    ----------
    unit: str
        ``"HU"``, ``"1"`` (or empty, unitless), ``"%"``, ``"mm"``, ... or any UCUM
        expression, which is used as is.

    Returns
    -------
    pydicom.sr.coding.Code
        UCUM code (scheme designator ``"UCUM"``).

    Raises
    ------
    ValueError
        When ``unit`` contains whitespace or a backslash (not a UCUM expression).
    """
    alias = _UNIT_ALIASES.get(unit.strip().lower())
    if alias is not None:
        return alias
    if re.search(r"[\s\\]", unit):
        raise ValueError(f"unit {unit!r} is not a UCUM expression")
    return Code(unit, "UCUM", unit)


def coding_scheme_identification() -> CodingSchemeIdentificationItem:
    """A fresh Coding Scheme Identification item declaring ``99QGATE``."""
    return CodingSchemeIdentificationItem(
        designator=SCHEME,
        name=SCHEME_NAME,
        responsible_organization="qgate project",
    )


# Better names for the outputs qgate's own scorers are known to produce. Unknown outputs
# still get a derived concept; these only improve the wording shown by SR viewers.
for _output, _meaning in {
    "noise_sigma_hu": "Image noise (robust SD)",
    "noise_sigma_hu_p90": "Image noise (robust SD), 90th percentile",
    "noise_slices_measured": "Slices with a noise measurement",
    "snr_roi_count": "SNR regions measured",
    "snr": "Signal-to-noise ratio",
    "score": "Image quality score",
    "mean_quality": "Mean predicted structural similarity",
    "body_quality": "Mean predicted structural similarity in the body",
    "dose_class": "Dose class",
    "window_class": "Window class",
    "brisque": "BRISQUE score",
}.items():
    register_output_concept(_output, Code(_output, SCHEME, _meaning))
