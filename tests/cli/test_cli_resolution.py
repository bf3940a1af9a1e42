"""How `mytune <recipe>` finds what to run (shipped name, then file, then module path) and the clear errors for a
moved params file or a config written for another recipe. In-process, against the fake layout of conftest.py."""

import sys

import pytest

from mytune.cli import recipes
from mytune.cli.main import main
from mytune.errors import MytuneError

FLAVORS = '''import sys
from mytune.errors import MytuneError


def tiny(argv):
    print(f"TINY {argv}")


def exits_3(argv):
    return 3


def broken(argv):
    raise MytuneError("broken flavor")


if __name__ == "__main__":
    print(f"MAIN {sys.argv[1:]}")
'''

OTHER_PARAMS = '''from dataclasses import dataclass


@dataclass
class OtherParams:
    model: str = ""  # model name
    dataset_path: str = ""  # data
    batch_size: int = 1  # batch
'''


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    return err.strip()


@pytest.fixture
def my_pkg(tmp_path, monkeypatch):
    """tmp_path/my_pkg/flavors.py, importable from tmp_path (the working directory) only."""
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "flavors.py").write_text(FLAVORS)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for name in [m for m in sys.modules if m == "my_pkg" or m.startswith("my_pkg.")]:
        del sys.modules[name]


def test_resolution_order_shipped_then_file_then_module(fake_recipes, my_pkg):
    assert recipes.resolve_recipe("fake_ft") == fake_recipes / "fake_ft.py"
    (my_pkg / "fake_ft.py").write_text("")  # a file of the same name does not shadow the shipped recipe
    assert recipes.resolve_recipe("fake_ft") == fake_recipes / "fake_ft.py"
    assert recipes.resolve_recipe("./fake_ft.py") == my_pkg / "fake_ft.py"
    assert recipes.resolve_recipe("my_pkg/flavors.py") == my_pkg / "my_pkg" / "flavors.py"
    module = recipes.resolve_recipe("my_pkg.flavors:tiny")
    assert module == recipes.ModuleRecipe("my_pkg.flavors", "tiny", my_pkg / "my_pkg" / "flavors.py")
    assert recipes.resolve_recipe("my_pkg.flavors").function is None
    with pytest.raises(MytuneError, match=r"^recipe file my_pkg/nope.py does not exist$"):
        recipes.resolve_recipe("my_pkg/nope.py")  # a .py name is a file, never the module `my_pkg/nope.py`


def test_unknown_names_list_the_closest_shipped_recipes(fake_recipes, my_pkg, capsys):
    assert main(["fake_fx", "--config", "small"]) == 2
    assert one_error_line(capsys).startswith("mytune: error: unknown recipe `fake_fx`: did you mean `fake_ft`?")
    assert main(["my_pkg.fake_fy:run"]) == 2
    message = one_error_line(capsys)
    assert message.startswith("mytune: error: unknown recipe `my_pkg.fake_fy:run`: not a shipped recipe, not a file, "
                              "and module `my_pkg.fake_fy` is not importable from ")
    assert message.endswith("did you mean the shipped `fake_ft`?")


def test_module_function_gets_the_recipe_args(fake_recipes, my_pkg, capsys):
    assert main(["my_pkg.flavors:tiny", "--config=x", "--override", "lr=1"]) == 0
    assert capsys.readouterr().out == "TINY ['--config=x', '--override', 'lr=1']\n"
    assert main(["my_pkg.flavors:exits_3"]) == 3
    assert main(["my_pkg.flavors:broken"]) == 2
    assert one_error_line(capsys) == "mytune: error: broken flavor"
    assert main(["my_pkg.flavors:tinny"]) == 2
    assert one_error_line(capsys) == "mytune: error: module `my_pkg.flavors` has no function `tinny`: did you mean `tiny`?"


def test_module_without_function_runs_as_python_dash_m(fake_recipes, my_pkg, capsys):
    argv, path = list(sys.argv), list(sys.path)
    assert main(["my_pkg.flavors", "--config", "y"]) == 0
    assert capsys.readouterr().out == "MAIN ['--config', 'y']\n"
    assert sys.argv == argv and sys.path == path


def test_shipped_recipe_main_is_a_module_flavor(tmp_path, monkeypatch, capsys):
    """`recipes.<name>:main` is the shipped recipe's `main(argv)`: the module form with a real recipe."""
    monkeypatch.chdir(tmp_path)
    argv = ["recipes.full_finetune_single_device:main", "--config", "tiny_demo",
            "--override", f"output_dir={tmp_path}", "max_steps_per_epoch=1", "epochs=1"]
    assert main(argv) == 0
    assert (tmp_path / "step_1" / "model.safetensors").is_file()


def test_moved_params_file_is_one_clear_line(fake_recipes, tmp_path, capsys):
    dest = tmp_path / "mine" / "my_ft.py"
    main(["cp", "fake_ft", str(dest)])
    (tmp_path / "mine" / "my_ft_params.py").rename(tmp_path / "my_ft_params.py")
    capsys.readouterr()
    for argv in ([str(dest)], ["validate", str(dest)]):
        assert main(argv) == 2
        assert one_error_line(capsys) == (
            f"mytune: error: my_ft.py line 8 imports its params from `my_ft_params`, but {dest.parent / 'my_ft_params.py'} "
            "does not exist: move the params file back next to the recipe, or fix the import"
        )


def test_renamed_copy_still_finds_its_params(fake_recipes, tmp_path, capsys):
    main(["cp", "fake_ft", str(tmp_path / "my_ft.py")])
    (tmp_path / "my_ft.py").rename(tmp_path / "renamed.py")
    capsys.readouterr()
    assert main(["validate", str(tmp_path / "renamed.py"), "--override", "lr=0.5"]) == 0
    assert main([str(tmp_path / "renamed.py"), "--override", "epochs=4"]) == 0
    assert "RESULT FakeParams(lr=0.1, epochs=4" in capsys.readouterr().out


@pytest.fixture
def other_recipe(fake_recipes, monkeypatch):
    """A second fake recipe with other params and its config `base`; the fake `recipes` package is the importable one
    (the real one's modules are set aside, and put back by monkeypatch after this fixture removes the fake ones)."""
    (fake_recipes / "other_ft.py").write_text("from recipes.params.other_ft import OtherParams\n")
    (fake_recipes / "params" / "other_ft.py").write_text(OTHER_PARAMS)
    (fake_recipes / "params" / "__init__.py").write_text("")
    (fake_recipes / "configs" / "other_ft").mkdir()
    (fake_recipes / "configs" / "other_ft" / "base.yaml").write_text("model: m\ndataset_path: d\nbatch_size: 4\n")
    monkeypatch.syspath_prepend(str(fake_recipes.parent))
    for name in [m for m in sys.modules if m == "recipes" or m.startswith("recipes.")]:
        monkeypatch.delitem(sys.modules, name)
    yield fake_recipes
    for name in [m for m in sys.modules if m == "recipes" or m.startswith("recipes.")]:
        del sys.modules[name]


def test_config_of_another_recipe_names_that_recipe(other_recipe, tmp_path, capsys):
    config = other_recipe / "configs" / "other_ft" / "base.yaml"
    for argv in (["fake_ft", f"--config={config}"], ["validate", "fake_ft", "--config", str(config)]):
        assert main(argv) == 2
        assert one_error_line(capsys) == (
            f"mytune: error: config {config} does not fit recipe fake_ft: 3 of its 3 keys are not params of fake_ft "
            "(`model`, `dataset_path`, `batch_size`); it looks like a config of `other_ft` "
            "(see `mytune ls` and `mytune fake_ft --help`)"
        )
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("alpha: 1\nbeta: 2\nlr: 0.3\n")
    assert main(["fake_ft", "--config", str(unknown)]) == 2
    assert one_error_line(capsys).endswith("(`alpha`, `beta`); it may be a config of another recipe "
                                           "(see `mytune ls` and `mytune fake_ft --help`)")
    typo = tmp_path / "typo.yaml"
    typo.write_text("lr: 0.3\nepocs: 2\n")  # one typo in a fitting config: the parser's "did you mean"
    assert main(["fake_ft", "--config", str(typo)]) == 2
    assert one_error_line(capsys).endswith(f"unknown key `epocs` in {typo}; did you mean `epochs`?")
