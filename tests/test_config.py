from __future__ import annotations

import json
from pathlib import Path

import pytest

from radfinder_node.cli import main
from radfinder_node.config import load_settings


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert (s.ae_title, s.port, s.quiet_period_s, s.fsync) == ("RADFINDER", 11112, 5.0, True)
    assert s.allowed_calling_aes == []
    assert s.effective_database_url == f"sqlite:///{(tmp_path / 'data' / 'radfinder.db')}"
    assert s.selection["rules"][0]["name"] == "chest-ct"


def test_toml_env_and_overrides_in_priority_order(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "radfinder.toml").write_text(
        'ae_title = "FROMTOML"\nport = 104\nquiet_period_s = 9\nfsync = false\n'
        'allowed_calling_aes = ["PACS1", "PACS2"]\n'
    )
    s = load_settings()
    assert (s.ae_title, s.port, s.quiet_period_s, s.fsync) == ("FROMTOML", 104, 9.0, False)
    assert s.allowed_calling_aes == ["PACS1", "PACS2"]
    monkeypatch.setenv("RADFINDER_PORT", "4242")
    monkeypatch.setenv("RADFINDER_ALLOWED_CALLING_AES", '["ONLY"]')
    s = load_settings()
    assert (s.ae_title, s.port, s.allowed_calling_aes) == ("FROMTOML", 4242, ["ONLY"])
    s = load_settings(port=5555, ae_title="CLI")
    assert (s.ae_title, s.port) == ("CLI", 5555)


def test_selection_rules_from_toml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "radfinder.toml").write_text(
        """
[selection]
one_per_study = false
prefer = ["thinnest"]
[[selection.rules]]
name = "any-ct"
all = [{attribute = "Modality", in = ["CT"]}]
"""
    )
    s = load_settings()
    assert s.selection["rules"][0]["name"] == "any-ct"
    assert s.selection["one_per_study"] is False


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('ae_title = "WAY_TOO_LONG_AE_TITLE"', "AE title"),
        ("port = 70000", "port"),
        ("no_such_key = 1", "no_such_key"),
        (
            '[selection]\n[[selection.rules]]\nname="x"\nall=[{attribute="Modality", regex="("}]',
            "regex",
        ),
    ],
)
def test_bad_config_is_refused_with_reason(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    toml: str,
    needle: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "radfinder.toml").write_text(toml)
    assert main(["config", "show"]) == 2
    assert needle in capsys.readouterr().err


def test_config_show_prints_effective_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RADFINDER_AE_TITLE", "ENVAE")
    assert main(["config", "show", "--json", "--data-dir", str(tmp_path / "d")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["ae_title"] == "ENVAE"
    assert shown["data_dir"] == str(tmp_path / "d")
    assert shown["effective_database_url"].endswith("/d/radfinder.db")
    assert main(["config", "show"]) == 0
    assert 'ae_title = "ENVAE"' in capsys.readouterr().out
