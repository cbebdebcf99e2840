"""No code file outside trainer/models/ knows a model by name (issue 20: a model is one file and its test).

Every .py file under core/, edge/ and trainer/ (trainer/models/ aside) is read as Python tokens; identifiers,
string literals (docstrings included) and comments are searched for every registered model's name in its
registered form (``skip-ganomaly``), its config-section form (``skip_ganomaly``) and the display name people
write (``Skip-GANomaly``), case-insensitively, as whole words (``geometric`` is not ``geom``; ``GeomScore`` and
``geom_score`` are). The default model is named exactly once, in ``trainer/config.py``'s ``DEFAULT_MODEL``.
"""

from __future__ import annotations

import io
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

from trainer.config import DEFAULT_MODEL
from trainer.models import get_model_class, list_models, section_key

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("core", "edge", "trainer")
EXEMPT = ROOT / "trainer" / "models"
SEARCHED_TOKENS = (tokenize.NAME, tokenize.STRING, tokenize.COMMENT)

# Words that contain a model's name but mean something else; each with why it is not the model.
ALLOWED_PHRASES = {
    r"mahalanobis[-_ ]?distances?": "the Mahalanobis distance (Mahalanobis 1936) is the mathematics of every "
                                    "Gaussian model (trainer/gaussian.py), not the model registered as "
                                    "'mahalanobis'",
    r"CSI cameras?": "MIPI CSI, the camera connector of a Jetson board (edge/sources), not the model registered as "
                     "'csi'",
}


@dataclass(frozen=True)
class Hit:
    path: str
    line: int
    model: str
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.text!r} names model '{self.model}'"


def name_forms() -> dict[str, list[str]]:
    """Registered model name -> the forms it is written in (registered, section key, display name)."""
    forms = {}
    for name in list_models():
        display = get_model_class(name).display_name or name
        forms[name] = sorted({name, section_key(name), display})
    return forms


def _pattern(form: str) -> re.Pattern[str]:
    parts = [re.escape(p) for p in re.split(r"[-_ ]+", form) if p]
    return re.compile(r"[-_ ]?".join(parts), re.IGNORECASE)


def _is_word(text: str, start: int, end: int) -> bool:
    """Whole word: not glued to letters or digits, except at a camel-case step (``GeomScore``)."""
    left_ok = start == 0 or not text[start - 1].isalnum() or (text[start - 1].islower() and text[start].isupper())
    right_ok = end == len(text) or not text[end].isalnum() or (text[end].isupper() and text[end - 1].islower())
    return left_ok and right_ok


def _allowed_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for phrase in ALLOWED_PHRASES for m in re.finditer(phrase, text, re.IGNORECASE)]


def scan_source(source: str, path: str, forms: dict[str, list[str]]) -> list[Hit]:
    """Every model name in the identifiers, strings and comments of Python ``source``."""
    patterns = [(model, _pattern(form)) for model, model_forms in forms.items() for form in model_forms]
    hits = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in SEARCHED_TOKENS:
            continue
        allowed = _allowed_spans(token.string)
        for model, pattern in patterns:
            for m in pattern.finditer(token.string):
                if not _is_word(token.string, m.start(), m.end()):
                    continue
                if any(a <= m.start() and m.end() <= b for a, b in allowed):
                    continue
                line = token.start[0] + token.string.count("\n", 0, m.start())
                hits.append(Hit(path, line, model, m.group(0)))
    return sorted(set(hits), key=lambda h: (h.path, h.line, h.model, h.text))


def scanned_files() -> list[Path]:
    return sorted(p for root in SCANNED for p in (ROOT / root).rglob("*.py")
                  if EXEMPT not in p.parents and "__pycache__" not in p.parts)


def test_no_file_outside_the_models_names_a_model() -> None:
    forms = name_forms()
    hits = [hit for path in scanned_files()
            for hit in scan_source(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)), forms)]
    default = [h for h in hits if h.model == DEFAULT_MODEL]
    others = [h for h in hits if h.model != DEFAULT_MODEL]
    assert not others, "model names outside trainer/models/ (word them by kind, or move the code into the " \
        "model's file):\n" + "\n".join(map(str, others))
    assert len(default) == 1, "the default model is named in exactly one place:\n" + "\n".join(map(str, default))
    assert default[0].path == "trainer/config.py"
    line = (ROOT / default[0].path).read_text(encoding="utf-8").splitlines()[default[0].line - 1]
    assert line.startswith("DEFAULT_MODEL = "), line


def test_every_file_is_scanned() -> None:
    files = {str(p.relative_to(ROOT)) for p in scanned_files()}
    assert {"trainer/config.py", "trainer/cli.py", "trainer/loop.py", "core/configfile.py"} <= files
    assert not any(f.startswith("trainer/models/") for f in files)


@pytest.mark.parametrize("source, expected", [
    ('"""Uses PatchCore\'s bank."""\n', ["PatchCore"]),
    ("x = 1  # as in Skip-GANomaly\n", ["Skip-GANomaly"]),
    ("skip_ganomaly_weights = 2\n", ["skip_ganomaly"]),
    ("class GeomScore:\n    pass\n", ["Geom"]),
    ("msg = f'deep-svdd: {x}'\n", ["deep-svdd"]),
    ("text = 'the Deep SVDD sphere'\n", ["Deep SVDD"]),
    ("label = 'PaDiM and SPADE'\n", ["PaDiM", "SPADE"]),
    ("note = 'Mahalanobis AD fits levels'\n", ["Mahalanobis"]),
])
def test_the_scan_finds_a_planted_name(source: str, expected: list[str], tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text(source, encoding="utf-8")
    hits = scan_source(planted.read_text(encoding="utf-8"), str(planted), name_forms())
    found = [h.text for h in hits]
    for word in expected:
        assert any(word.lower() in text.lower() for text in found), (word, found)


@pytest.mark.parametrize("source", [
    "def geometric_copies():\n    pass\n",
    "x = 'the GEOMETRY of a part'\n",
    "d = mahalanobis_distance(a)  # the Mahalanobis distance of each feature\n",
    "class MahalanobisDistance:\n    pass\n",
    "spades = 3  # patch cores and a spadework\n",
])
def test_the_scan_leaves_other_words_alone(source: str) -> None:
    assert scan_source(source, "<planted>", name_forms()) == []
