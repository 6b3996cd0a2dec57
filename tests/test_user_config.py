from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from openpto.errors import UsageError
from openpto.user_config import UserConfig, command_default_map, dumps, load, save


def test_round_trip_keeps_every_value_and_unknown_sections(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[defaults]\nmodel = "x"\n\n[other]\nkeep = 1\n')
    config = load(path)
    config.defaults.update({"device": "cuda:1", "samples": 64, "calib": 'a "quoted" path\\n'})
    config.theme = "light"
    config.keys = {"job.run": "f5", "app.home": "ctrl+h"}
    save(config, path)
    again = load(path)
    assert again.defaults == {"model": "x", "device": "cuda:1", "samples": 64,
                              "calib": 'a "quoted" path\\n'}
    assert again.theme == "light"
    assert again.keys == {"job.run": "f5", "app.home": "ctrl+h"}
    assert again.extra["other"] == {"keep": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"]  # no temporary file left


def test_a_missing_file_is_empty_defaults(tmp_path: Path) -> None:
    config = load(tmp_path / "none.toml")
    assert config.defaults == {} and config.theme == "dark" and config.keys == {}


@pytest.mark.parametrize("text, needle", [
    ("[defaults\nmodel = 1", "is not valid TOML"),
    ('[tui]\ntheme = "blue"', "theme must be one of dark, light"),
    ("[defaults]\nmodel = [1, 2]", "[defaults] model must be a string"),
])
def test_a_bad_file_is_one_error_naming_it(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        load(path)
    assert needle in str(info.value)
    assert str(path) in str(info.value)


def test_a_failed_save_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    save(UserConfig(defaults={"model": "old"}), path)
    with pytest.raises(UsageError):
        save(UserConfig(defaults={"model": "new"}, theme="blue"), path)
    assert load(path).defaults == {"model": "old"}


def test_dumps_writes_nested_tables() -> None:
    text = dumps({"defaults": {"a": True, "b": 1.5}, "tui": {"theme": "dark",
                                                            "keys": {"x.y": "f1"}}})
    assert text == ('[defaults]\na = true\nb = 1.5\n\n[tui]\ntheme = "dark"\n\n'
                    '[tui.keys]\n"x.y" = "f1"\n')


def test_default_map_gives_each_command_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    save(UserConfig(defaults={"device": "cuda"}), path)
    assert command_default_map(["eval", "quantize"], path) == {
        "eval": {"device": "cuda"}, "quantize": {"device": "cuda"}}
    assert command_default_map(["eval"], tmp_path / "missing.toml") == {}


def test_the_cli_takes_its_defaults_from_config_toml(tmp_path: Path) -> None:
    home = tmp_path / "home"
    save(UserConfig(defaults={"method": "rtn", "bits": 8}), home / "config.toml")
    env = {**os.environ, "OPT_HOME": str(home), "OPT_DB": str(tmp_path / "opt.db")}
    out = subprocess.run([sys.executable, "-m", "openpto", "quantize", "--show-config", "--json"],
                         env=env, capture_output=True, text=True, timeout=120, check=True)
    shown = json.loads(out.stdout)
    assert shown["type"] == "rtn"
    assert shown["config"]["bits"] == 8
    # A flag on the command line still wins over the file.
    out = subprocess.run([sys.executable, "-m", "openpto", "quantize", "--method", "gptq",
                          "--show-config", "--json"], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    assert json.loads(out.stdout)["type"] == "gptq"
    (home / "config.toml").write_text("[defaults\n")
    bad = subprocess.run([sys.executable, "-m", "openpto", "info", "--json"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "is not valid TOML" in bad.stderr
