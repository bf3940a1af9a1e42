"""`mytune` ls / cp / validate / run, against a fake recipes layout (see conftest.py) and the shipped one."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from mytune.cli.main import main

REPO = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    return err.strip()


def test_help_lists_commands_and_recipes(fake_recipes, capsys):
    for argv in ([], ["--help"], ["-h"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        for command in ("mytune ls", "mytune cp", "mytune validate", "mytune <recipe>", "torchrun flags"):
            assert command in out
        assert "fake_ft  small" in out


def test_ls_lists_recipes_and_configs_without_non_recipes(fake_recipes, capsys):
    (fake_recipes / "configs" / "fake_ft" / "big.yaml").write_text("")
    (fake_recipes / "other_recipe.py").write_text("")
    assert main(["ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["RECIPE", "CONFIGS"]
    assert lines[1].split() == ["fake_ft", "big,", "small"]
    assert lines[2].split() == ["other_recipe", "-"]
    assert len(lines) == 3  # neither __init__ nor interfaces


def test_ls_and_help_of_shipped_layout_never_import_torch():
    code = (
        "import sys; from mytune.cli.main import main; assert main(['ls']) == 0; assert main(['--help']) == 0; "
        "heavy = {'torch', 'transformers', 'recipes'} & set(sys.modules); assert not heavy, heavy"
    )
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stderr
    assert "full_finetune_single_device" in result.stdout
    assert time.perf_counter() - start < 2.0  # ~0.05 s in practice; generous for a loaded CI machine


def test_cp_recipe_to_directory_rewrites_import(fake_recipes, tmp_path, capsys):
    dest = tmp_path / "mine"
    dest.mkdir()
    assert main(["cp", "fake_ft", str(dest)]) == 0
    copied, params = dest / "fake_ft.py", dest / "fake_ft_params.py"
    assert capsys.readouterr().out.splitlines() == [f"wrote {copied}", f"wrote {params}"]
    text = copied.read_text()
    assert "from fake_ft_params import FakeParams" in text and "recipes.params" not in text
    assert params.read_text() == (fake_recipes / "params" / "fake_ft.py").read_text()


def test_cp_recipe_copy_runs_standalone(fake_recipes, tmp_path, capsys):
    dest = tmp_path / "work" / "my_ft.py"  # parent dirs are created
    assert main(["cp", "fake_ft", str(dest)]) == 0
    assert (tmp_path / "work" / "my_ft_params.py").is_file()
    assert "from my_ft_params import FakeParams" in dest.read_text()
    # python my_ft.py, from another directory: finds my_ft_params.py next to it, not the fake `recipes`.
    result = subprocess.run(
        [sys.executable, str(dest), "--override", "lr=0.25"], capture_output=True, text=True, env=ENV, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "RESULT FakeParams(lr=0.25, epochs=1" in result.stdout
    # mytune <path>: in-process, the copy's directory goes first on sys.path.
    capsys.readouterr()
    assert main([str(dest), "--override", "epochs=3"]) == 0
    assert "RESULT FakeParams(lr=0.1, epochs=3" in capsys.readouterr().out


def test_cp_refuses_to_overwrite_unless_forced(fake_recipes, tmp_path, capsys):
    dest = tmp_path / "my_ft.py"
    (tmp_path / "my_ft_params.py").write_text("keep me")
    assert main(["cp", "fake_ft", str(dest)]) == 2
    assert one_error_line(capsys) == f"mytune: error: {tmp_path / 'my_ft_params.py'} already exists: pass --force to overwrite"
    assert not dest.exists()  # nothing half-written
    assert main(["cp", "fake_ft", str(dest), "--force"]) == 0
    assert "FakeParams" in (tmp_path / "my_ft_params.py").read_text()


def test_cp_recipe_destination_must_be_a_module_name(fake_recipes, tmp_path, capsys):
    assert main(["cp", "fake_ft", str(tmp_path / "my-ft.py")]) == 2
    assert "valid Python module name" in one_error_line(capsys)
    assert main(["cp", "fake_ft", str(tmp_path / "my_ft")]) == 2
    assert "must end in .py" in one_error_line(capsys)


def test_cp_config_to_directory_and_file(fake_recipes, tmp_path, capsys):
    assert main(["cp", "fake_ft/small", str(tmp_path)]) == 0
    assert (tmp_path / "small.yaml").read_text() == "lr: 0.5\nepochs: 2\n"
    assert main(["cp", "fake_ft/small", str(tmp_path / "custom.yaml")]) == 0
    assert (tmp_path / "custom.yaml").is_file()
    assert capsys.readouterr().out.splitlines() == [f"wrote {tmp_path / 'small.yaml'}", f"wrote {tmp_path / 'custom.yaml'}"]
    assert main(["cp", "fake_ft/small", str(tmp_path)]) == 2
    assert "already exists: pass --force" in one_error_line(capsys)


def test_cp_unknown_names_suggest_closest(fake_recipes, tmp_path, capsys):
    assert main(["cp", "fake_f", str(tmp_path)]) == 2
    assert one_error_line(capsys) == "mytune: error: unknown recipe or config `fake_f`: did you mean `fake_ft`, `fake_ft/small`?"
    assert main(["cp", "fake_ft/smal", str(tmp_path)]) == 2
    assert one_error_line(capsys) == "mytune: error: unknown config `fake_ft/smal`: did you mean `fake_ft/small`?"
    assert main(["cp", "fake_ft"]) == 2
    assert "the following arguments are required: dest" in one_error_line(capsys)


def test_unknown_recipe_suggests_closest(fake_recipes, capsys):
    assert main(["fake_tf", "--config", "small"]) == 2
    message = one_error_line(capsys)
    assert message.startswith("mytune: error: unknown recipe `fake_tf`: did you mean `fake_ft`?")
    assert main(["missing_recipe.py"]) == 2
    assert one_error_line(capsys) == "mytune: error: recipe file missing_recipe.py does not exist"


def test_run_restores_argv_and_path_and_propagates_exit_codes(fake_recipes, tmp_path, capsys):
    dest = tmp_path / "runner.py"
    assert main(["cp", "fake_ft", str(dest)]) == 0
    argv, path = list(sys.argv), list(sys.path)
    assert main([str(dest), "--override", "exit_code=3"]) == 3
    assert sys.argv == argv and sys.path == path
    assert f"argv={['--override', 'exit_code=3']}" in capsys.readouterr().out
    # The recipe's own parser reports its errors (exit 2), and a MytuneError escaping the recipe becomes one line.
    assert main([str(dest), "--override", "lrr=1"]) == 2
    assert one_error_line(capsys) == "runner.py: error: unknown key `lrr` on the command line; did you mean `lr`?"
    assert main([str(dest), "--override", "fail=true"]) == 2
    assert one_error_line(capsys) == "mytune: error: fake failure requested"


def test_recipe_help_is_the_recipes_own(fake_recipes, tmp_path, capsys):
    dest = tmp_path / "helped.py"
    main(["cp", "fake_ft", str(dest)])
    capsys.readouterr()
    assert main([str(dest), "--help"]) == 0
    out = capsys.readouterr().out
    assert "  lr (float) = 0.1\n      learning rate\n" in out and "exit_code" in out


def test_validate_copied_recipe_ok_with_missing_path_warning(fake_recipes, tmp_path, capsys):
    dest = tmp_path / "val_ft.py"
    main(["cp", "fake_ft", str(dest)])
    main(["cp", "fake_ft/small", str(tmp_path)])
    capsys.readouterr()
    rc = main(["validate", str(dest), "--config", str(tmp_path / "small.yaml"), "--override", "data_path=/no/such.json"])
    captured = capsys.readouterr()
    assert rc == 0
    assert captured.out == "OK: val_ft config valid\n"
    assert captured.err == "warning: data_path: /no/such.json does not exist (set data_path=... to training data file)\n"


def test_validate_errors_are_one_line_exit_2(fake_recipes, tmp_path, capsys):
    dest = tmp_path / "bad_ft.py"
    main(["cp", "fake_ft", str(dest)])
    capsys.readouterr()
    assert main(["validate", str(dest), "--override", "epochs=many"]) == 2
    assert one_error_line(capsys) == "mytune validate bad_ft: error: epochs: invalid value 'many' (command line), expected int"
    assert main(["validate"]) == 2
    assert "validate needs a recipe" in one_error_line(capsys)
    lonely = tmp_path / "lonely.py"
    lonely.write_text("")
    assert main(["validate", str(lonely)]) == 2
    assert "no params file for recipe" in one_error_line(capsys)


def test_validate_shipped_recipe_by_name(tmp_path, capsys):
    pytest.importorskip("recipes.params.full_finetune_single_device")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: llama_tiny\ntokenizer_path: {tmp_path}\ndataset_path: {cfg}\ndevice: cpu\n")
    assert main(["validate", "full_finetune_single_device", "--config", str(cfg), "--override", "lr=1e-4"]) == 0
    assert capsys.readouterr().out == "OK: full_finetune_single_device config valid\n"
    assert main(["validate", "full_finetune_single_device", "--config", str(cfg), "--override", "lrr=1"]) == 2
    assert one_error_line(capsys).endswith("unknown key `lrr` on the command line; did you mean `lr`?")


def test_subcommand_help_and_version_return_codes(capsys):
    assert main(["cp", "--help"]) == 0
    assert "copy a recipe" in capsys.readouterr().out
    assert main(["ls", "--help"]) == 0
    assert main(["ls", "extra"]) == 2
    assert one_error_line(capsys) == "mytune: error: mytune ls: unrecognized arguments: extra"
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("mytune 0.")
