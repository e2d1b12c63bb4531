"""Where a project's files are found: an explicit folder, else $FUSIONRANK_HOME, else the working directory; the
default spec, scenarios and SLO file come from the installed packages."""

from __future__ import annotations

from pathlib import Path

import fusionrank
from fusionrank.contract.project import ENV_HOME, default_spec_path, model_repository_dir, project_dir, reports_dir
from fusionrank.contract.spec import load_spec
from fusionrank_cli.main import main


def test_project_folder_is_explicit_then_environment_then_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_HOME, raising=False)
    monkeypatch.chdir(tmp_path)
    assert project_dir() == tmp_path.resolve()
    monkeypatch.setenv(ENV_HOME, str(tmp_path / "home"))
    assert project_dir() == (tmp_path / "home").resolve()
    assert project_dir(tmp_path / "explicit") == (tmp_path / "explicit").resolve()
    assert model_repository_dir() == (tmp_path / "home" / "model_repository").resolve()
    assert reports_dir() == (tmp_path / "home" / "reports").resolve()


def test_default_spec_is_the_projects_else_the_packaged_one(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_HOME, str(tmp_path))
    packaged = default_spec_path()
    assert packaged.is_file() and packaged.is_relative_to(Path(fusionrank.__file__).parent)
    (tmp_path / "pipeline.yaml").write_text(packaged.read_text().replace("max_candidates: 64", "max_candidates: 32"))
    assert default_spec_path() == tmp_path / "pipeline.yaml"
    assert load_spec().serving.max_candidates == 32


def test_cli_project_option_places_the_repository_there(tmp_path, monkeypatch):
    # setenv (not delenv) so monkeypatch restores the variable that `--project` sets for the process.
    monkeypatch.setenv(ENV_HOME, str(tmp_path / "not-this-one"))
    monkeypatch.chdir(tmp_path)
    project = tmp_path / "elsewhere"
    assert main(["render", "--project", str(project)]) == 0
    assert (project / "model_repository" / "rank" / "config.pbtxt").is_file()
    assert not (tmp_path / "model_repository").exists() and not (tmp_path / "not-this-one").exists()
