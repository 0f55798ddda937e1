"""Chest-CT report text in the style of CT-RATE, with the truth of every image citation.

The snippet miner learns to find "series 2, image 45" in free text and to map it to a slice; it
can only be measured (and the model's depth head only trained on synthetic data) if every
citation comes with where it points. So the report is written together with, for each citation,
its character span, series, instance number, z index and the finding it belongs to.

What makes mining hard in real reports is reproduced on purpose: the many citation forms
radiologists type, citations inside or at the end of a sentence, two-image citations for
elongated findings, sizes with units, vertebral levels, dates and counts elsewhere in the text,
and negated findings (which must never yield a pair). Numbers that could pass for an image number
are never placed next to a citation (sizes always carry a unit; levels, dates and counts live in
sentences without one), so the truth is unambiguous.

Offsets: ``Citation.start``/``end`` index ``Report.text``. Citations occur only in the findings
section, which sits verbatim in ``Report.text`` at ``Report.findings_offset``, so
``Report.findings_span(c)`` indexes ``Report.findings`` (the CT-RATE ``Findings_EN`` column).

Everything is a pure function of the arguments and ``seed`` (``random.Random``); no DICOM, no HL7.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

__all__ = [
    "CITATION_FORMS",
    "LANGUAGES",
    "REPORT_LABELS",
    "Citation",
    "FindingLike",
    "Report",
    "write_report",
]

LANGUAGES: Final = ("en", "de")


class FindingLike(Protocol):
    """The part of ``engines.data.findings.Finding`` a report needs (read-only)."""

    @property
    def label(self) -> str: ...

    @property
    def label_index(self) -> int: ...

    @property
    def side(self) -> str | None: ...

    @property
    def lobe(self) -> str | None: ...

    @property
    def size_mm(self) -> float: ...

    @property
    def center_voxel(self) -> Sequence[int]: ...

    @property
    def z_extent(self) -> Sequence[int]: ...

    @property
    def extra(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class Citation:
    """One image reference in the text and what it truly points at.

    ``start``/``end`` are offsets into ``Report.text`` (see the module docstring for the findings
    section). A two-image citation ("images 206 and 286") lists both in ``images``/``z_indices``;
    ``image``/``z_index`` are then the first of them. ``snippet`` is the sentence with the citation
    (and the words that introduce it) removed: what a miner should pair with ``z_index``.
    """

    finding_label: str
    start: int
    end: int
    series: int | None
    image: int
    z_index: int
    form: str
    images: tuple[int, ...]
    z_indices: tuple[int, ...]
    sentence_start: int
    sentence_end: int
    snippet: str
    finding_index: int


@dataclass(frozen=True)
class Report:
    """A report in CT-RATE's four sections plus the assembled text and its citations' truth.

    ``negations`` maps every label the report states as absent to the sentence that says so.
    """

    clinical_information: str
    technique: str
    findings: str
    impressions: str
    citations: list[Citation]
    text: str
    language: str
    findings_offset: int
    negations: dict[str, str] = field(default_factory=dict)

    def findings_span(self, citation: Citation) -> tuple[int, int]:
        """The citation's offsets inside ``findings`` instead of ``text``."""
        return citation.start - self.findings_offset, citation.end - self.findings_offset


# ---------------------------------------------------------------------------------------------
# Where each label is reported. CT-RATE reads top to bottom: airways, mediastinum and heart,
# lungs, pleura, upper abdomen, bones.

_SECTIONS: Final = ("airways", "mediastinum", "lungs", "pleura", "abdomen", "bones")

_SECTION_OF: Final[Mapping[str, str]] = {
    "Medical material": "mediastinum",
    "Arterial wall calcification": "mediastinum",
    "Cardiomegaly": "mediastinum",
    "Pericardial effusion": "mediastinum",
    "Coronary artery wall calcification": "mediastinum",
    "Hiatal hernia": "mediastinum",
    "Lymphadenopathy": "mediastinum",
    "Emphysema": "lungs",
    "Atelectasis": "lungs",
    "Lung nodule": "lungs",
    "Lung opacity": "lungs",
    "Pulmonary fibrotic sequela": "lungs",
    "Pleural effusion": "pleura",
    "Mosaic attenuation pattern": "lungs",
    "Peribronchial thickening": "airways",
    "Consolidation": "lungs",
    "Bronchiectasis": "airways",
    "Interlobular septal thickening": "lungs",
}
# The 18 CT-RATE labels in their column order; a test checks this against engines.data.labels.
REPORT_LABELS: Final = tuple(_SECTION_OF)

# Templates: no sentence starts with a digit (it could follow a citation: "image 45. 2 ...").
# ``{cite}`` marks where a citation goes (glued to the word before it: the citation's
# wrapper brings its own leading space or punctuation). Slots: {size}, {in_loc}, {side_adv},
# {Side_adj}, {device}, {Device}, {station}. Templates with {size} are used only when the size
# is known.
_POSITIVE: Final[Mapping[str, Mapping[str, tuple[str, ...]]]] = {
    "en": {
        "Medical material": (
            "{Device} is noted{cite}.",
            "Medical material consistent with {device} is seen{cite}.",
            "There is {device}{cite}.",
        ),
        "Arterial wall calcification": (
            "Atheromatous calcifications are observed in the wall of the thoracic aorta{cite}.",
            "Calcified atherosclerotic plaques in the aortic arch and descending aorta{cite}.",
            "Arterial wall calcification is present in the aorta and its branches{cite}.",
        ),
        "Cardiomegaly": (
            "The heart is enlarged{cite}.",
            "Cardiomegaly is present{cite}; the cardiothoracic ratio is increased.",
            "Heart size is increased{cite}.",
        ),
        "Pericardial effusion": (
            "Pericardial effusion measuring {size} in thickness is seen{cite}.",
            "There is a pericardial effusion with a maximum thickness of {size}{cite}.",
            "Pericardial effusion is observed{cite}.",
        ),
        "Coronary artery wall calcification": (
            "Calcified plaques are seen in the coronary arteries{cite}.",
            "Coronary artery wall calcifications are noted{cite}.",
            "Atherosclerotic calcification of the left anterior descending artery{cite}.",
        ),
        "Hiatal hernia": (
            "A hiatal hernia is present{cite}.",
            "Sliding-type hiatal hernia{cite}.",
            "The stomach herniates through the esophageal hiatus, a hiatal hernia{cite}.",
        ),
        "Lymphadenopathy": (
            "Enlarged lymph nodes are seen in the {station}, the largest {size} in short "
            "axis{cite}.",
            "Lymphadenopathy in the {station} with a short axis of {size}{cite}.",
            "A lymph node of pathological size is observed in the {station}{cite}.",
        ),
        "Emphysema": (
            "Centrilobular emphysematous changes are observed {in_loc}{cite}.",
            "Emphysema {in_loc}{cite}.",
            "Paraseptal emphysema is seen {in_loc}{cite}.",
        ),
        "Atelectasis": (
            "Subsegmental atelectasis {in_loc}{cite}.",
            "Linear atelectasis is observed {in_loc}{cite}.",
            "Platelike atelectatic changes are seen {in_loc}{cite}.",
        ),
        "Lung nodule": (
            "{A_size} nodule is seen {in_loc}{cite}.",
            "There is {a_size} solid nodule {in_loc}{cite}.",
            "Nodule {in_loc}, measuring {size}{cite}.",
            "{A_size} non-calcified pulmonary nodule {in_loc}{cite}.",
            "A pulmonary nodule is seen {in_loc}{cite}.",
        ),
        "Lung opacity": (
            "Ground-glass opacity {in_loc}{cite}.",
            "{A_size} area of ground-glass density is seen {in_loc}{cite}.",
            "Patchy opacities are observed {in_loc}{cite}.",
        ),
        "Pulmonary fibrotic sequela": (
            "Fibrotic sequelae {in_loc}{cite}.",
            "Parenchymal bands consistent with fibrotic sequelae {in_loc}{cite}.",
            "Fibroatelectatic sequela changes are seen {in_loc}{cite}.",
        ),
        "Pleural effusion": (
            "{Side_adj} pleural effusion measuring {size} in thickness{cite}.",
            "Pleural effusion is present {side_adv}{cite}.",
            "{Side_adj} pleural effusion is observed{cite}.",
        ),
        "Mosaic attenuation pattern": (
            "Mosaic attenuation pattern is observed {in_loc}{cite}.",
            "Heterogeneous parenchymal density consistent with mosaic attenuation {in_loc}{cite}.",
        ),
        "Peribronchial thickening": (
            "Peribronchial thickening {in_loc}{cite}.",
            "Bronchial wall thickening is noted {in_loc}{cite}.",
        ),
        "Consolidation": (
            "Consolidation {in_loc}{cite}.",
            "{A_size} consolidated area with air bronchograms {in_loc}{cite}.",
            "Pneumonic consolidation is seen {in_loc}{cite}.",
        ),
        "Bronchiectasis": (
            "Cylindrical bronchiectasis {in_loc}{cite}.",
            "Bronchiectatic changes are observed {in_loc}{cite}.",
        ),
        "Interlobular septal thickening": (
            "Interlobular septal thickening {in_loc}{cite}.",
            "Thickening of the interlobular septa is noted {in_loc}{cite}.",
        ),
    },
    "de": {
        "Medical material": (
            "{Device} in regelrechter Lage{cite}.",
            "Fremdmaterial: {device}{cite}.",
        ),
        "Arterial wall calcification": (
            "Atherosklerotische Wandverkalkungen der thorakalen Aorta{cite}.",
            "Kalzifizierte Plaques im Aortenbogen und in der Aorta descendens{cite}.",
        ),
        "Cardiomegaly": (
            "Kardiomegalie{cite}.",
            "Das Herz ist vergrößert{cite}.",
        ),
        "Pericardial effusion": (
            "Perikarderguss mit einer Breite von {size}{cite}.",
            "Schmaler Perikarderguss{cite}.",
        ),
        "Coronary artery wall calcification": (
            "Verkalkungen der Koronararterien{cite}.",
            "Koronarsklerose mit kalzifizierten Plaques{cite}.",
        ),
        "Hiatal hernia": (
            "Axiale Hiatushernie{cite}.",
            "Hiatushernie{cite}.",
        ),
        "Lymphadenopathy": (
            "Vergrößerte Lymphknoten {station}, der größte mit {size} Kurzachse{cite}.",
            "Lymphadenopathie {station}{cite}.",
        ),
        "Emphysema": (
            "Zentrilobuläres Lungenemphysem {in_loc}{cite}.",
            "Emphysematöse Veränderungen {in_loc}{cite}.",
        ),
        "Atelectasis": (
            "Streifige Atelektase {in_loc}{cite}.",
            "Dystelektase {in_loc}{cite}.",
        ),
        "Lung nodule": (
            "Rundherd {in_loc}, {size} groß{cite}.",
            "Solider Lungenrundherd {in_loc}, Durchmesser {size}{cite}.",
            "Lungenrundherd {in_loc}{cite}.",
        ),
        "Lung opacity": (
            "Milchglastrübung {in_loc}{cite}.",
            "Fleckige Verdichtungen {in_loc}{cite}.",
        ),
        "Pulmonary fibrotic sequela": (
            "Fibrotische Residuen {in_loc}{cite}.",
            "Narbige Veränderungen {in_loc}{cite}.",
        ),
        "Pleural effusion": (
            "Pleuraerguss {side_adv}, Breite {size}{cite}.",
            "Pleuraerguss {side_adv}{cite}.",
        ),
        "Mosaic attenuation pattern": (
            "Mosaikartige Dichteunterschiede des Lungenparenchyms {in_loc}{cite}.",
            "Mosaikmuster {in_loc}{cite}.",
        ),
        "Peribronchial thickening": (
            "Peribronchiale Wandverdickung {in_loc}{cite}.",
            "Verdickte Bronchialwände {in_loc}{cite}.",
        ),
        "Consolidation": (
            "Konsolidierung {in_loc}{cite}.",
            "Infiltrat mit positivem Aerobronchogramm {in_loc}{cite}.",
        ),
        "Bronchiectasis": (
            "Zylindrische Bronchiektasen {in_loc}{cite}.",
            "Bronchiektasen {in_loc}{cite}.",
        ),
        "Interlobular septal thickening": (
            "Verdickung der interlobulären Septen {in_loc}{cite}.",
            "Verdickte Interlobulärsepten {in_loc}{cite}.",
        ),
    },
}

_NEGATIVE: Final[Mapping[str, Mapping[str, tuple[str, ...]]]] = {
    "en": {
        "Medical material": ("No medical device or foreign material is seen.",),
        "Arterial wall calcification": (
            "No calcification in the aortic wall.",
            "The thoracic aorta shows no atherosclerotic wall calcification.",
        ),
        "Cardiomegaly": (
            "Heart size is normal.",
            "Heart contour and size are normal.",
            "No cardiomegaly.",
        ),
        "Pericardial effusion": (
            "No pericardial effusion.",
            "Pericardial effusion-thickening was not observed.",
        ),
        "Coronary artery wall calcification": (
            "No coronary artery calcification.",
            "The coronary arteries show no calcified plaque.",
        ),
        "Hiatal hernia": ("No hiatal hernia.", "No hiatal hernia is seen."),
        "Lymphadenopathy": (
            "No lymph nodes of pathological size in the mediastinum or hila.",
            "No mediastinal or hilar lymphadenopathy.",
        ),
        "Emphysema": ("No emphysema.", "No emphysematous changes."),
        "Atelectasis": ("No atelectasis.", "No atelectatic changes are observed."),
        "Lung nodule": (
            "No pulmonary nodule or mass.",
            "No nodular lesion is detected in either lung.",
        ),
        "Lung opacity": ("No ground-glass opacity.", "No parenchymal opacity."),
        "Pulmonary fibrotic sequela": ("No fibrotic sequelae.", "No fibrotic changes."),
        "Pleural effusion": ("No pleural effusion.", "No pleural effusion or thickening."),
        "Mosaic attenuation pattern": (
            "No mosaic attenuation pattern.",
            "Parenchymal density is homogeneous, without mosaic attenuation.",
        ),
        "Peribronchial thickening": (
            "No peribronchial thickening.",
            "Bronchial walls are of normal thickness.",
        ),
        "Consolidation": ("No consolidation.", "No infiltrate or consolidation."),
        "Bronchiectasis": ("No bronchiectasis.", "No bronchiectatic changes."),
        "Interlobular septal thickening": (
            "No interlobular septal thickening.",
            "Interlobular septa are not thickened.",
        ),
    },
    "de": {
        "Medical material": ("Kein Fremdmaterial.",),
        "Arterial wall calcification": ("Keine Wandverkalkungen der Aorta.",),
        "Cardiomegaly": ("Herz normal groß.", "Keine Kardiomegalie."),
        "Pericardial effusion": ("Kein Perikarderguss.",),
        "Coronary artery wall calcification": ("Keine Koronarverkalkungen.",),
        "Hiatal hernia": ("Keine Hiatushernie.",),
        "Lymphadenopathy": ("Keine pathologisch vergrößerten Lymphknoten mediastinal oder hilär.",),
        "Emphysema": ("Kein Emphysem.",),
        "Atelectasis": ("Keine Atelektasen.",),
        "Lung nodule": ("Keine pulmonalen Rundherde.",),
        "Lung opacity": ("Keine Milchglastrübungen.",),
        "Pulmonary fibrotic sequela": ("Keine fibrotischen Veränderungen.",),
        "Pleural effusion": ("Kein Pleuraerguss.",),
        "Mosaic attenuation pattern": ("Kein Mosaikmuster.",),
        "Peribronchial thickening": ("Keine peribronchiale Wandverdickung.",),
        "Consolidation": ("Keine Konsolidierungen.",),
        "Bronchiectasis": ("Keine Bronchiektasen.",),
        "Interlobular septal thickening": ("Keine Verdickung der interlobulären Septen.",),
    },
}

_IMPRESSION_NAME: Final[Mapping[str, Mapping[str, str]]] = {
    "en": {label: label for label in REPORT_LABELS},
    "de": {
        "Medical material": "Fremdmaterial",
        "Arterial wall calcification": "Arterielle Wandverkalkungen",
        "Cardiomegaly": "Kardiomegalie",
        "Pericardial effusion": "Perikarderguss",
        "Coronary artery wall calcification": "Koronarverkalkungen",
        "Hiatal hernia": "Hiatushernie",
        "Lymphadenopathy": "Lymphadenopathie",
        "Emphysema": "Lungenemphysem",
        "Atelectasis": "Atelektase",
        "Lung nodule": "Lungenrundherd",
        "Lung opacity": "Milchglastrübung",
        "Pulmonary fibrotic sequela": "Fibrotische Residuen",
        "Pleural effusion": "Pleuraerguss",
        "Mosaic attenuation pattern": "Mosaikmuster",
        "Peribronchial thickening": "Peribronchiale Wandverdickung",
        "Consolidation": "Konsolidierung",
        "Bronchiectasis": "Bronchiektasen",
        "Interlobular septal thickening": "Verdickung der interlobulären Septen",
    },
}

# Sentences that carry no label. Levels, dates and counts live here (never next to a citation)
# so that a miner has to learn to ignore them.
_FILLERS: Final[Mapping[str, Mapping[str, tuple[str, ...]]]] = {
    "en": {
        "airways": (
            "Trachea and both main bronchi are patent.",
            "Trachea and main bronchi are open; no endobronchial lesion is seen.",
            "The trachea is midline and both main bronchi are patent.",
        ),
        "mediastinum": (
            "Mediastinal main vascular structures are of normal calibre.",
            "The ascending aorta measures {aorta} mm.",
            "Thoracic esophagus calibration is normal; no significant wall thickening.",
            "Thyroid lobes included in the sections are normal.",
        ),
        "lungs": (
            "Lung parenchyma was evaluated in the lung window.",
            "Both lungs are normally aerated.",
        ),
        "pleura": ("No pneumothorax.",),
        "abdomen": (
            "Upper abdominal organs included in the sections are unremarkable.",
            "A simple cyst measuring {cyst} mm is seen in the liver.",
            "The gallbladder contains {count} small calculi.",
            "The adrenal glands are unchanged compared with the examination of {date}.",
        ),
        "bones": (
            "Degenerative osteophytes in the thoracic spine, most prominent at T{lv}-T{lv2}.",
            "Vertebral corpus heights are preserved.",
            "A healed fracture of the {rib} right rib is noted.",
            "Schmorl's node in the T{lv} vertebral body.",
            "Bone structures in the study area are natural.",
        ),
    },
    "de": {
        "airways": ("Trachea und Hauptbronchien frei.", "Zentrale Atemwege frei."),
        "mediastinum": (
            "Mediastinale Gefäße normkalibrig.",
            "Aorta ascendens {aorta} mm.",
            "Ösophagus unauffällig.",
        ),
        "lungs": ("Lungen regelrecht belüftet.",),
        "pleura": ("Kein Pneumothorax.",),
        "abdomen": (
            "Miterfasste Oberbauchorgane unauffällig.",
            "Einfache Leberzyste von {cyst} mm.",
            "Gallenblase mit {count} kleinen Konkrementen.",
            "Nebennieren unverändert im Vergleich zur Voruntersuchung vom {date}.",
        ),
        "bones": (
            "Degenerative Spondylophyten der BWS, betont in Höhe BWK {lv} bis {lv2}.",
            "Wirbelkörperhöhen erhalten.",
            "Schmorl-Knötchen in BWK {lv}.",
        ),
    },
}

_CLINICAL: Final[Mapping[str, tuple[str, ...]]] = {
    "en": (
        "Cough for {weeks} weeks.",
        "Follow-up of a pulmonary nodule; prior CT dated {date}.",
        "Shortness of breath. Smoker, {packs} pack-years.",
        "Fever and elevated CRP.",
        "Staging of a known malignancy.",
        "Chest pain, {weeks} days.",
    ),
    "de": (
        "Husten seit {weeks} Wochen.",
        "Verlaufskontrolle Rundherd, Voruntersuchung vom {date}.",
        "Dyspnoe. Raucher, {packs} pack years.",
        "Fieber, CRP erhöht.",
        "Staging bei bekanntem Malignom.",
    ),
}

_TECHNIQUE: Final[Mapping[str, tuple[str, ...]]] = {
    "en": (
        "Non-contrast chest CT was performed in the axial plane with {t} mm slice thickness; "
        "coronal and sagittal reformats were evaluated.",
        "Non-contrast chest CT, axial {t} mm sections from the lung apices to the adrenal "
        "glands, evaluated in lung and mediastinal windows.",
        "Thorax CT without contrast medium, {t} mm axial sections.",
    ),
    "de": (
        "Native CT des Thorax in axialer Schichtführung, Schichtdicke {t} mm, koronare und "
        "sagittale Rekonstruktionen.",
        "Nativ-CT Thorax, {t} mm Schichten von den Lungenspitzen bis zu den Nebennieren.",
    ),
}

_NO_FINDINGS: Final[Mapping[str, tuple[str, ...]]] = {
    "en": (
        "No acute cardiopulmonary pathology.",
        "Normal non-contrast chest CT.",
        "No significant pathology in the thorax.",
    ),
    "de": ("Kein pathologischer Befund im Thorax.", "Unauffälliges natives CT des Thorax."),
}

_FOLLOW_UP: Final[Mapping[str, str]] = {
    "en": "Follow-up CT in {months} months is recommended.",
    "de": "Verlaufskontrolle in {months} Monaten empfohlen.",
}

_HEADINGS: Final[Mapping[str, tuple[str, str, str, str]]] = {
    "en": ("CLINICAL INFORMATION", "TECHNIQUE", "FINDINGS", "IMPRESSION"),
    "de": ("KLINISCHE ANGABEN", "TECHNIK", "BEFUND", "BEURTEILUNG"),
}

# English devices are singular: the templates say "is noted".
_DEVICES: Final[Mapping[str, tuple[str, ...]]] = {
    "en": (
        "a cardiac pacemaker",
        "a central venous catheter",
        "a port catheter",
        "a nasogastric tube",
    ),
    "de": ("Herzschrittmacher", "zentraler Venenkatheter", "Sternotomie-Cerclagen", "Portsystem"),
}

_STATIONS: Final[Mapping[str, tuple[str, ...]]] = {
    "en": (
        "subcarinal region",
        "right paratracheal region",
        "prevascular region",
        "left hilar region",
        "aortopulmonary window",
    ),
    "de": (
        "subkarinal",
        "rechts paratracheal",
        "im vorderen Mediastinum",
        "hilär links",
        "im aortopulmonalen Fenster",
    ),
}


# ---------------------------------------------------------------------------------------------
# Citation forms, as typed in real reports. ``{c}`` in a wrapper is the citation itself; the
# wrapper's other characters belong to the sentence, not the citation span.


@dataclass(frozen=True)
class _Form:
    name: str
    patterns: tuple[str, ...]
    wrappers: tuple[str, ...]
    pair: bool = False


_BARE_EN: Final = (" ({c})", " on {c}", ", {c}", "; {c}")
_PAREN: Final = (" {c}",)

_FORMS: Final[Mapping[str, tuple[_Form, ...]]] = {
    "en": (
        _Form(
            "series_image",
            ("series {s}, image {i}", "Series {s}, Image {i}", "series {s} image {i}"),
            _BARE_EN,
        ),
        _Form("series_section", ("(series {s} section {i})", "(series {s}, section {i})"), _PAREN),
        _Form("serial_image", ("serial: {s} image: {i}",), _BARE_EN),
        _Form("se_im_total", ("(Se: {s}, Im: {i}/{n})", "(Se {s}, Im {i}/{n})"), _PAREN),
        _Form("section_no_total", ("(Section No: {i}/{n})",), _PAREN),
        _Form(
            "image_in_series", ("(in image {i} in series {s})", "(image {i} of series {s})"), _PAREN
        ),
        _Form("section", ("section {i}", "Section {i}"), (" ({c})", " on {c}", " at {c}")),
        _Form("image", ("image {i}", "Image {i}"), (" ({c})", " on {c}", " in {c}")),
        _Form("images_pair", ("images {i} and {j}",), (" on {c}", " ({c})", " between {c}"), True),
    ),
    "de": (
        _Form("serie_bild", ("Serie {s}, Bild {i}", "Serie {s} Bild {i}"), (" ({c})", "; {c}")),
        _Form("serie_bild_paren", ("(Serie {s}/Bild {i})",), _PAREN),
        _Form("bild", ("Bild {i}",), (" ({c})", " in {c}", "; {c}")),
        _Form("schicht", ("Schicht {i}",), (" ({c})", " in {c}")),
        _Form("serie_schicht_total", ("(Serie {s}, Schicht {i}/{n})",), _PAREN),
        _Form("se_im_total", ("(Se: {s}, Im: {i}/{n})",), _PAREN),
        _Form("bilder_pair", ("Bilder {i} und {j}",), (" ({c})", "; {c}"), True),
    ),
}
CITATION_FORMS: Final[Mapping[str, tuple[str, ...]]] = {
    lang: tuple(f.name for f in forms) for lang, forms in _FORMS.items()
}
_PAIR_PROBABILITY: Final = 0.35
_CITE_MARK: Final = "\x00"


# ---------------------------------------------------------------------------------------------
# Small pure helpers


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _size_text(size_mm: float, rng: random.Random, lang: str) -> str:
    """Sizes always carry a unit, so they can never be mistaken for an image number."""
    if size_mm >= 10 and rng.random() < 0.2:
        value = f"{size_mm / 10:.1f}"
        return f"{value.replace('.', ',') if lang == 'de' else value} cm"
    if size_mm < 3:
        value = f"{size_mm:.1f}"
        return f"{value.replace('.', ',') if lang == 'de' else value} mm"
    return f"{round(size_mm)} mm"


def _indefinite(size: str) -> str:
    """'a' or 'an' before a spoken number: an 8 mm, an 11 mm, an 18 mm, a 12 mm."""
    number = size.split()[0].split(".")[0]
    vowel = number.startswith("8") or number in ("11", "18")
    return f"an {size}" if vowel else f"a {size}"


_LOBE_CODES: Final[Mapping[str, tuple[str, str]]] = {
    "rul": ("right", "upper"),
    "rml": ("right", "middle"),
    "rll": ("right", "lower"),
    "lul": ("left", "upper"),
    "lll": ("left", "lower"),
}
_DE_SIDE: Final = {"right": "rechten", "left": "linken"}
_DE_LOBE: Final = {"upper": "Oberlappen", "middle": "Mittellappen", "lower": "Unterlappen"}


def _lobe_parts(side: str | None, lobe: str | None) -> tuple[str | None, str | None]:
    """(side, level) from whatever spelling the phantom uses ("RUL", "right upper", "upper")."""
    if not lobe:
        return side, None
    key = lobe.strip().lower().replace("_", " ").replace("-", " ")
    if key in _LOBE_CODES:
        return _LOBE_CODES[key]
    if "lingula" in key:
        return "left", "lingula"
    words = key.replace(" lobe", "").split()
    level = next((w for w in words if w in ("upper", "middle", "lower")), None)
    lobe_side = next((w for w in words if w in ("left", "right")), None)
    return lobe_side or side, level


def _in_location(side: str | None, lobe: str | None, rng: random.Random, lang: str) -> str:
    """The prepositional phrase for where a lung finding is ("in the right upper lobe")."""
    lobe_side, level = _lobe_parts(side, lobe)
    if lang == "de":
        if level == "lingula":
            return "in der Lingula"
        if level == "middle":
            return "im Mittellappen"
        if level and lobe_side in _DE_SIDE:
            return f"im {_DE_SIDE[lobe_side]} {_DE_LOBE[level]}"
        if lobe_side in ("left", "right"):
            return f"in der {_DE_SIDE[lobe_side]} Lunge"
        return rng.choice(("in beiden Lungen", "beidseits"))
    if level == "lingula":
        return "in the lingula"
    if level and lobe_side in ("left", "right"):
        return rng.choice(
            (f"in the {lobe_side} {level} lobe", f"in the {level} lobe of the {lobe_side} lung")
        )
    if level:
        return f"in the {level} lobe"
    if lobe_side in ("left", "right"):
        return f"in the {lobe_side} lung"
    return rng.choice(("in both lungs", "bilaterally"))


def _side_words(side: str | None, lang: str) -> tuple[str, str]:
    """(adverb, capitalised adjective) for one-sided findings such as pleural effusion."""
    if lang == "de":
        return {"right": "rechts", "left": "links"}.get(side or "", "beidseits"), ""
    if side in ("left", "right"):
        return f"on the {side}", f"{_capitalise(side)}-sided"
    if side == "bilateral":
        return "bilaterally", "Bilateral"
    return "", "A"


def _slots(finding: FindingLike | None, rng: random.Random, lang: str) -> dict[str, str]:
    side = finding.side if finding else None
    lobe = finding.lobe if finding else None
    size_mm = float(finding.size_mm) if finding else 0.0
    extra: Mapping[str, Any] = finding.extra if finding else {}
    size = _size_text(size_mm, rng, lang) if size_mm > 0 else ""
    device = str(extra.get("device") or rng.choice(_DEVICES[lang]))
    side_adv, side_adj = _side_words(side, lang)
    a_size = _indefinite(size) if size else ""
    return {
        "size": size,
        "a_size": a_size,
        "A_size": _capitalise(a_size),
        "in_loc": _in_location(side, lobe, rng, lang),
        "side_adv": side_adv,
        "Side_adj": side_adj,
        "device": device,
        "Device": _capitalise(device),
        "station": str(extra.get("station") or rng.choice(_STATIONS[lang])),
    }


def _usable(template: str, slots: Mapping[str, str]) -> bool:
    """A template is usable when every slot it names has a value (no size, no size template)."""
    return all(value or "{" + name + "}" not in template for name, value in slots.items())


def _filler_values(rng: random.Random) -> dict[str, str]:
    """Numbers for the filler sentences: levels, dates, counts, aortic diameter."""
    level = rng.randint(3, 10)
    return {
        "aorta": str(rng.randint(28, 38)),
        "cyst": str(rng.randint(4, 25)),
        "count": str(rng.randint(2, 5)),
        "date": f"{rng.randint(1, 28):02d}.{rng.randint(1, 12):02d}.{rng.randint(2015, 2023)}",
        "lv": str(level),
        "lv2": str(level + rng.randint(1, 3)),
        "rib": f"{rng.randint(5, 9)}th",
        "weeks": str(rng.randint(2, 8)),
        "packs": str(rng.randint(10, 60)),
        "months": str(rng.choice((3, 6, 12))),
    }


# ---------------------------------------------------------------------------------------------
# Sentences with an optional citation


@dataclass(frozen=True)
class _Cite:
    """A citation relative to its sentence, before the sentence is placed in the text."""

    start: int
    end: int
    label: str
    series: int | None
    images: tuple[int, ...]
    z_indices: tuple[int, ...]
    form: str
    snippet: str
    finding_index: int


@dataclass(frozen=True)
class _Sentence:
    text: str
    cite: _Cite | None = None


def _cited_slices(finding: FindingLike, pair: bool, rng: random.Random) -> tuple[int, ...]:
    """z indices a citation points at: the centre, or two ends of a range inside the extent."""
    first, last = int(finding.z_extent[0]), int(finding.z_extent[1])
    shown = _slices_showing(finding, first, last)
    if pair:
        third = (last - first) // 3
        low = [z for z in shown if z <= first + third] or shown[:1]
        high = [z for z in shown if z >= last - third] or shown[-1:]
        return rng.choice(low), rng.choice(high)
    centre = min(max(int(finding.center_voxel[0]), first), last)
    return (min(shown, key=lambda z: (abs(z - centre), z)),)


def _slices_showing(finding: FindingLike, first: int, last: int) -> list[int]:
    """Slices that show the finding, when it can say (``mask_z``); else its whole extent.

    Scattered findings (calcified specks, septal lines) leave empty slices inside their extent,
    and a citation must point at a slice where a reader would see the finding."""
    mask_z = getattr(finding, "mask_z", None)
    shown = [z for z in mask_z() if first <= z <= last] if callable(mask_z) else []
    return shown or list(range(first, last + 1))


def _choose_form(finding: FindingLike, rng: random.Random, lang: str) -> _Form:
    forms = _FORMS[lang]
    elongated = int(finding.z_extent[1]) - int(finding.z_extent[0]) >= 2
    if elongated and rng.random() < _PAIR_PROBABILITY:
        return rng.choice([f for f in forms if f.pair])
    return rng.choice([f for f in forms if not f.pair])


def _citation_text(
    form: _Form, images: Sequence[int], series: int, n_slices: int, rng: random.Random
) -> str:
    pattern = rng.choice(form.patterns)
    return pattern.format(s=series, i=images[0], j=images[-1], n=n_slices)


def _positive_sentence(
    finding: FindingLike,
    finding_index: int,
    cite: bool,
    *,
    series: int,
    n_slices: int,
    instance_of: Callable[[int], int],
    rng: random.Random,
    lang: str,
) -> _Sentence:
    slots = _slots(finding, rng, lang)
    template = rng.choice([t for t in _POSITIVE[lang][finding.label] if _usable(t, slots)])
    before, after = template.format(**slots, cite=_CITE_MARK).split(_CITE_MARK)
    if not cite:
        return _Sentence(before + after)
    form = _choose_form(finding, rng, lang)
    # Two images are written in ascending instance order whatever the numbering direction.
    pairs = sorted((instance_of(z), z) for z in _cited_slices(finding, form.pair, rng))
    images = tuple(p[0] for p in pairs)
    inner = _citation_text(form, images, series, n_slices, rng)
    wrapper = rng.choice(form.wrappers)
    lead = wrapper.index("{c}")
    wrapped = wrapper.replace("{c}", inner)
    return _Sentence(
        before + wrapped + after,
        _Cite(
            start=len(before) + lead,
            end=len(before) + lead + len(inner),
            label=finding.label,
            series=series if "{s}" in form.patterns[0] else None,
            images=images,
            z_indices=tuple(p[1] for p in pairs),
            form=form.name,
            snippet=before + after,
            finding_index=finding_index,
        ),
    )


def _uncited_positive(label: str, rng: random.Random, lang: str) -> _Sentence:
    """A present label the caller knows of but has no located finding for."""
    slots = _slots(None, rng, lang)
    template = rng.choice([t for t in _POSITIVE[lang][label] if _usable(t, slots)])
    return _Sentence(template.format(**slots, cite=""))


# How many filler sentences a section gets (min, max); a report that says everything twice reads
# like no real one.
_FILLER_COUNT: Final[Mapping[str, tuple[int, int]]] = {
    "airways": (1, 1),
    "mediastinum": (1, 2),
    "lungs": (0, 1),
    "pleura": (0, 1),
    "abdomen": (1, 2),
    "bones": (1, 2),
}


def _fillers(section: str, values: Mapping[str, str], rng: random.Random, lang: str) -> list[str]:
    pool = _FILLERS[lang].get(section, ())
    low, high = _FILLER_COUNT[section]
    k = rng.randint(min(low, len(pool)), min(high, len(pool)))
    return [s.format(**values) for s in rng.sample(pool, k)]


def _impression(
    present: Sequence[str],
    first_finding: Mapping[str, FindingLike],
    values: Mapping[str, str],
    rng: random.Random,
    lang: str,
) -> str:
    if not present:
        return rng.choice(_NO_FINDINGS[lang])
    parts: list[str] = []
    for label in present:
        name = _IMPRESSION_NAME[lang][label]
        finding = first_finding.get(label)
        if finding is not None and _SECTION_OF[label] in ("lungs", "airways"):
            name = f"{name} {_in_location(finding.side, finding.lobe, rng, lang)}"
        elif finding is not None and _SECTION_OF[label] == "pleura" and finding.side:
            name = f"{name} {_side_words(finding.side, lang)[0]}"
        parts.append(f"{name}.")
    if "Lung nodule" in present:
        parts.append(_FOLLOW_UP[lang].format(**values))
    return " ".join(parts)


def _assemble(
    sections: Sequence[str], sentences: Sequence[_Sentence], lang: str
) -> tuple[str, str, int, list[tuple[int, _Sentence]]]:
    """Full text, findings, where the findings start, and each findings sentence's offset."""
    clinical, technique, impressions = sections
    h_ci, h_tech, h_find, h_imp = _HEADINGS[lang]
    head = f"{h_ci}:\n{clinical}\n\n{h_tech}:\n{technique}\n\n{h_find}:\n"
    placed: list[tuple[int, _Sentence]] = []
    cursor = len(head)
    for i, sentence in enumerate(sentences):
        if i:
            cursor += 1  # the joining space
        placed.append((cursor, sentence))
        cursor += len(sentence.text)
    findings = " ".join(s.text for s in sentences)
    text = f"{head}{findings}\n\n{h_imp}:\n{impressions}\n"
    return text, findings, len(head), placed


def _to_citation(offset: int, sentence: _Sentence) -> Citation:
    c = sentence.cite
    assert c is not None
    return Citation(
        finding_label=c.label,
        start=offset + c.start,
        end=offset + c.end,
        series=c.series,
        image=c.images[0],
        z_index=c.z_indices[0],
        form=c.form,
        images=c.images,
        z_indices=c.z_indices,
        sentence_start=offset,
        sentence_end=offset + len(sentence.text),
        snippet=c.snippet,
        finding_index=c.finding_index,
    )


# ---------------------------------------------------------------------------------------------
# Public entry point


def write_report(
    findings: Sequence[FindingLike],
    *,
    seed: int,
    n_slices: int,
    series_number: int,
    instance_number_of_z: Callable[[int], int] | None = None,
    language: str = "en",
    clinical_information: str | None = None,
    present_labels: Collection[str] | None = None,
    cite_probability: float = 0.9,
    slice_thickness_mm: float = 1.5,
) -> Report:
    """A CT-RATE-style report of ``findings`` with the truth of each citation.

    Every label that is neither a finding nor in ``present_labels`` is stated as absent. A
    present finding is cited (at its centre slice, or at two slices of its z extent when
    elongated) with probability ``cite_probability``; real reports leave some findings uncited,
    and a miner must not invent a pair for them. ``instance_number_of_z`` maps a z index (0 =
    most inferior) to the slice's InstanceNumber; the default ``z + 1`` is wrong for series
    numbered from the top, which is why the caller can say. ``present_labels`` names labels
    present without a located finding (written without a citation).
    """
    if language not in _FORMS:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    unknown = sorted({f.label for f in findings} - set(_SECTION_OF))
    unknown += sorted(set(present_labels or ()) - set(_SECTION_OF))
    if unknown:
        raise ValueError(f"unknown labels {unknown}; expected CT-RATE's 18")
    if n_slices < 1:
        raise ValueError(f"n_slices must be positive, got {n_slices}")
    instance_of = instance_number_of_z or (lambda z: z + 1)
    rng = random.Random(seed)
    values = _filler_values(rng)

    order = sorted(range(len(findings)), key=lambda i: (findings[i].label_index, i))
    by_label: dict[str, list[int]] = {}
    for i in order:
        by_label.setdefault(findings[i].label, []).append(i)
    present = [lb for lb in REPORT_LABELS if lb in by_label or lb in (present_labels or ())]

    sentences: list[_Sentence] = []
    negations: dict[str, str] = {}
    for section in _SECTIONS:
        sentences += [_Sentence(s) for s in _fillers(section, values, rng, language)]
        for label in (lb for lb in REPORT_LABELS if _SECTION_OF[lb] == section):
            if label in by_label:
                for i in by_label[label]:
                    sentences.append(
                        _positive_sentence(
                            findings[i],
                            i,
                            rng.random() < cite_probability,
                            series=series_number,
                            n_slices=n_slices,
                            instance_of=instance_of,
                            rng=rng,
                            lang=language,
                        )
                    )
            elif label in present:
                sentences.append(_uncited_positive(label, rng, language))
            else:
                negations[label] = rng.choice(_NEGATIVE[language][label])
                sentences.append(_Sentence(negations[label]))

    clinical = clinical_information or rng.choice(_CLINICAL[language]).format(**values)
    thickness = f"{slice_thickness_mm:g}"
    technique = rng.choice(_TECHNIQUE[language]).format(
        t=thickness.replace(".", ",") if language == "de" else thickness
    )
    first = {label: findings[idx[0]] for label, idx in by_label.items()}
    impressions = _impression(present, first, values, rng, language)
    text, findings_text, offset, placed = _assemble(
        (clinical, technique, impressions), sentences, language
    )
    return Report(
        clinical_information=clinical,
        technique=technique,
        findings=findings_text,
        impressions=impressions,
        citations=[_to_citation(off, s) for off, s in placed if s.cite is not None],
        text=text,
        language=language,
        findings_offset=offset,
        negations=negations,
    )
