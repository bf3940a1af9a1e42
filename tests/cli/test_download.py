"""`mytune download` against a local fake hub (tests/cli/fake_hub.py) reached through HF_ENDPOINT: real HTTP,
real `huggingface_hub.snapshot_download`, no network."""

import hashlib
import os
import shlex
import sys
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")

from mytune.cli import download as dl  # noqa: E402
from mytune.cli.main import main  # noqa: E402
from tests.cli.fake_hub import FakeHub, FakeHubServer, FakeRepo  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def model_files() -> dict[str, bytes]:
    """A repo laid out like meta-llama's: sharded safetensors + index, configs, tokenizer, .bin and original/ copies."""
    weights = bytes(range(256)) * 4096  # 1 MiB: several download chunks, so a cut-off lands mid-file
    return {
        "config.json": b'{"model_type": "llama"}',
        "generation_config.json": b'{"bos_token_id": 1}',
        "model-00001-of-00002.safetensors": weights,
        "model-00002-of-00002.safetensors": weights[::-1],
        "model.safetensors.index.json": b'{"weight_map": {}}',
        "tokenizer.json": b'{"version": "1.0"}',
        "tokenizer_config.json": b'{"add_bos_token": true}',
        "special_tokens_map.json": b"{}",
        "tokenizer.model": b"\x0a\x0bsentencepiece",
        "pytorch_model.bin": b"pickled weights",
        "pytorch_model.bin.index.json": b"{}",
        "original/consolidated.00.pth": b"meta weights",
        "original/params.json": b"{}",
        "README.md": b"# a model card",
    }


WANTED = {"config.json", "generation_config.json", "model-00001-of-00002.safetensors",
          "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
          "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The fake hub serving `org/model` (open) and `org/gated` (token `hf_ok`), with HF_ENDPOINT pointing at it."""
    fake = FakeHub(repos={"org/model": FakeRepo(model_files()), "org/gated": FakeRepo(model_files(), gated_token="hf_ok")})
    with FakeHubServer(fake) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))  # no writes to the user's ~/.cache
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield fake


def downloaded(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and ".cache" not in p.parts}


def error_line(err: str) -> str:
    """The one `mytune: error:` line of stderr (the rest may be the hub's progress bars), and no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("mytune: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["download", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_default_files_are_weights_configs_and_tokenizer_byte_identical(hub, tmp_path, capsys):
    out = tmp_path / "Model"
    code, stdout, err = run_cli(["org/model", "--output-dir", str(out)], capsys)
    assert code == 0, err
    assert downloaded(out) == WANTED  # no .bin, .pth, original/ or README
    files = model_files()
    for name in WANTED:
        assert (out / name).read_bytes() == files[name], name
    assert f"checkpoint_dir={out}" in stdout
    assert not hub.gets("pytorch_model.bin") and not hub.gets("original/consolidated.00.pth")


def test_include_replaces_the_defaults_and_exclude_adds(hub, tmp_path, capsys):
    out = tmp_path / "orig"
    assert run_cli(["org/model", "--output-dir", str(out), "--include", "original/*", "*.bin"], capsys)[0] == 0
    assert downloaded(out) == {"original/consolidated.00.pth", "original/params.json", "pytorch_model.bin"}
    out2 = tmp_path / "no_tok"
    assert run_cli(["org/model", "--output-dir", str(out2), "--exclude", "tokenizer*", "special_tokens_map.json"],
                   capsys)[0] == 0
    assert downloaded(out2) == {n for n in WANTED if not n.startswith(("tokenizer", "special_tokens"))}


def test_default_output_dir_is_models_name(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run_cli(["org/model", "--include", "config.json"], capsys)
    assert code == 0, err
    assert (tmp_path / "models" / "model" / "config.json").read_bytes() == model_files()["config.json"]
    assert "models/model" in stdout


def test_gated_repo_is_one_line_and_a_token_opens_it(hub, tmp_path, capsys):
    out = tmp_path / "gated"
    code, _, err = run_cli(["org/gated", "--output-dir", str(out)], capsys)
    assert code == 2
    line = error_line(err)
    assert "org/gated is gated (401)" in line and "accept its license" in line
    assert "--hf-token" in line and "HF_TOKEN" in line and f"{hub_url()}/org/gated" in line
    assert not out.exists() or not downloaded(out)

    code, _, err = run_cli(["org/gated", "--output-dir", str(out), "--hf-token", "hf_ok"], capsys)
    assert code == 0, err
    assert downloaded(out) == WANTED


def hub_url() -> str:
    return os.environ["HF_ENDPOINT"]


def test_unknown_repo_is_one_line(hub, tmp_path, capsys):
    code, _, err = run_cli(["org/nope", "--output-dir", str(tmp_path / "x")], capsys)
    assert code == 2
    line = error_line(err)
    assert "org/nope was not found" in line and "(404)" in line and "spelling" in line


def test_no_server_is_the_offline_line(tmp_path, monkeypatch, capsys):
    with FakeHubServer(FakeHub(repos={})) as server:
        url = server.url  # a port that was just free, and is closed again below: connection refused
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    code, _, err = run_cli(["org/model", "--output-dir", str(tmp_path / "x")], capsys)
    assert code == 2
    line = error_line(err)
    assert "cannot reach" in line and f"HF_ENDPOINT={url}" in line and "offline" in line


def test_a_dropped_connection_resumes_with_a_range_request(hub, tmp_path, monkeypatch, capsys):
    """The server cuts the first shard off halfway; the download resumes from there and the file is identical."""
    import huggingface_hub.constants

    # The hub client writes in 10 MB chunks: smaller ones let a 1 MiB test file be resumed from its middle.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    name = "model-00001-of-00002.safetensors"
    hub.drop_once.add(f"org/model/{name}")
    out = tmp_path / "resumed"
    code, _, err = run_cli(["org/model", "--output-dir", str(out)], capsys)
    assert code == 0, err
    ranges = hub.gets(name)
    assert ranges[0] is None and len(ranges) == 2, ranges
    half = len(model_files()[name]) // 2
    resumed_at = int(ranges[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= half  # the bytes already received were not fetched again
    assert hashlib.sha256((out / name).read_bytes()).digest() == hashlib.sha256(model_files()[name]).digest()


def test_an_interrupted_run_continues_where_it_stopped(hub, tmp_path, capsys):
    """A run stopped by a hub failure is one line; the same command again fetches only what is missing."""
    name = "model-00002-of-00002.safetensors"
    hub.fail_once.add(f"org/model/{name}")
    out = tmp_path / "again"
    code, _, err = run_cli(["org/model", "--output-dir", str(out)], capsys)
    assert code == 2
    line = error_line(err)
    assert "answered 500" in line and "run the same command again" in line
    assert name not in downloaded(out)
    done = downloaded(out)
    hub.requests.clear()

    code, _, err = run_cli(["org/model", "--output-dir", str(out)], capsys)
    assert code == 0, err
    assert downloaded(out) == WANTED
    assert (out / name).read_bytes() == model_files()[name]
    fetched_again = {path.split("/resolve/")[1].split("/", 1)[1]
                     for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path}
    assert fetched_again == {name} and not done & fetched_again


def test_without_huggingface_hub_one_install_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    code, _, err = run_cli(["org/model"], capsys)
    assert code == 2
    assert err.strip() == f"mytune: error: {dl.INSTALL_HINT}"
    assert 'pip install "mytune[download]"' in err


def test_a_bad_repo_name_is_one_line(capsys):
    code, _, err = run_cli(["not-a-repo"], capsys)
    assert code == 2 and "owner/name" in error_line(err)


def test_every_shipped_model_config_names_its_hub_repo():
    """Each config but the tiny demo says which hub repo its checkpoint_dir holds (`hub_repo`)."""
    from mytune.cli.recipes import load_params_class
    from mytune.config import TuneArgumentParser

    configs = sorted((REPO / "recipes" / "configs").rglob("*.yaml"))
    assert configs
    for config in configs:
        recipe = config.relative_to(REPO / "recipes" / "configs").parts[0]
        params_cls = load_params_class(REPO / "recipes" / f"{recipe}.py")
        params = TuneArgumentParser(params_cls, recipe=recipe).parse_params(["--config", str(config)])
        if config.stem == "tiny_demo":
            assert params.hub_repo == "", config
        else:
            owner, _, name = params.hub_repo.partition("/")
            assert owner and name, f"{config}: set hub_repo: <owner/name>"


def test_missing_checkpoint_line_ends_with_the_download_command(tmp_path, capsys):
    missing = tmp_path / "no such dir" / "Llama-2-7b-hf"
    code = main(["lora_finetune_distributed", "--config", "llama2_7b", "--override", f"checkpoint_dir={missing}"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    command = f"mytune download meta-llama/Llama-2-7b-hf --output-dir {shlex.quote(str(missing))}"
    assert lines[0].endswith(command), lines[0]
