"""The README documents every flag and opens with the two fresh-machine commands."""

import dataclasses
from pathlib import Path

import pytest

from gaqprune.settings import FinetuneSettings, ImportanceSettings, PruneSettings, RunSettings

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def test_readme_opens_with_install_run_and_test_commands():
    lines = README.splitlines()
    assert lines[0] == "```bash" and lines[3] == "```"
    assert lines[1].startswith("pip install torch==2.13.0") and "gaqprune prune --config configs/" in lines[1]
    assert lines[2] == "python -m pytest -q"
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "\npython -m pytest -q\n" in ci


def test_every_flag_is_documented_with_its_default():
    for cls in (ImportanceSettings, PruneSettings, RunSettings, FinetuneSettings):
        for field in dataclasses.fields(cls):
            assert f"| `--{field.name}` | `{field.default}` |" in README, field.name


def test_fit_logs_every_10_steps_by_default(capsys):
    # Lightning's default of 50 logs no training loss at all in a fit shorter than that (the README's 40 steps)
    import yaml

    from gaqprune.cli.main import run

    with pytest.raises(SystemExit):
        run(["fit", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["log_every_n_steps"] == 10


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_parses(config, capsys):
    """Each scenario YAML is a valid `gaqprune prune` config (unknown or mistyped keys would fail here)."""
    import yaml

    from gaqprune.cli.main import run

    with pytest.raises(SystemExit) as done:
        run(["prune", "--config", str(REPO / "configs" / config), "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    written = yaml.safe_load((REPO / "configs" / config).read_text())
    for key, value in written.items():
        if not isinstance(value, dict):
            assert printed[key] == value, key
