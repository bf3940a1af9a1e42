"""`mytune download <owner/name>`: fetch a model from the Hugging Face hub into a plain directory for `checkpoint_dir`.

    mytune download meta-llama/Llama-3.2-1B-Instruct                      # -> ./models/Llama-3.2-1B-Instruct
    mytune download meta-llama/Llama-2-7b-hf --output-dir /models/Llama-2-7b-hf --hf-token hf_...
    mytune download meta-llama/Llama-3.1-8B-Instruct --include "original/*"  # Meta's original files instead

Built on `huggingface_hub.snapshot_download` (the `download` extra): it shows the hub's progress bars, skips files
already downloaded into the output directory, and resumes a file whose connection dropped (HTTP Range). By default
only what mytune reads is fetched: safetensors weights, config/generation_config JSON and tokenizer files, not
`.bin`/`.pth` duplicates or `original/`. The hub address comes from `HF_ENDPOINT` and the token from `--hf-token`,
`HF_TOKEN` or `hf auth login`, as everywhere in the Hugging Face tools. Every hub failure is one `MytuneError` line.
"""

import os
import re
import sys
from pathlib import Path

from mytune.errors import MytuneError

# What a checkpoint_dir needs: weights (+ index), config.json, generation_config.json, tokenizer files.
DEFAULT_INCLUDE = ["*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt", "*.jinja"]
# Duplicates of the weights in other formats, and Meta's original (non-HF) layout.
DEFAULT_EXCLUDE = ["original/*", "*.bin", "*.bin.index.json", "*.pth", "*.pt", "*.msgpack", "*.h5", "*.gguf", "*.onnx"]
DEFAULT_ENDPOINT = "https://huggingface.co"
INSTALL_HINT = 'downloading needs huggingface_hub: pip install "mytune[download]"'


def default_output_dir(repo_id: str) -> Path:
    """./models/<name>: a plain folder to set checkpoint_dir to (not the hub cache's snapshots/<hash> layout)."""
    return Path("models") / repo_id.split("/")[-1]


def file_patterns(include: list[str] | None, exclude: list[str] | None) -> tuple[list[str], list[str]]:
    """(allow, ignore) patterns: --include replaces the default file set and its exclusions; --exclude adds to them."""
    if include:
        return list(include), list(exclude or [])
    return list(DEFAULT_INCLUDE), DEFAULT_EXCLUDE + list(exclude or [])


def download(
    repo_id: str,
    output_dir: str | Path | None = None,
    *,
    token: str | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    revision: str | None = None,
) -> Path:
    """Download `repo_id` into `output_dir` (default ./models/<name>) and return that directory.

    The repo is looked up first (one request), so a gated, unknown or unreachable repo is one clear line before any
    file is fetched. `HF_ENDPOINT` and `HF_HUB_CACHE` are read at call time, not when huggingface_hub was imported.
    """
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise MytuneError(f"`{repo_id}` is not a hub repo name: give it as owner/name, e.g. meta-llama/Llama-3.2-1B")
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError:
        raise MytuneError(INSTALL_HINT) from None
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or DEFAULT_ENDPOINT
    token = token or None  # "" means: the saved login / HF_TOKEN, as None does
    out = Path(output_dir) if output_dir else default_output_dir(repo_id)
    allow, ignore = file_patterns(include, exclude)
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision)
        snapshot_download(
            repo_id,
            revision=info.sha or revision,  # the resolved commit: every file comes from the same one
            local_dir=out,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            endpoint=endpoint,
            token=token,
            allow_patterns=allow,
            ignore_patterns=ignore,
        )
    except Exception as err:  # noqa: BLE001 - every hub failure becomes one line; anything else is re-raised
        message = explain_hub_error(err, repo_id, endpoint, out)
        if message is None:
            raise
        raise MytuneError(message) from err
    return out


def explain_hub_error(err: BaseException, repo_id: str, endpoint: str, out: Path) -> str | None:
    """The one line for a hub failure (gated, unknown repo, no network, a dropped transfer); None for anything else."""
    try:
        from huggingface_hub.errors import (
            GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError,
        )
    except ImportError:  # huggingface_hub < 0.24 keeps them in utils
        from huggingface_hub.utils import (
            GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError,
        )

    page = f"{endpoint}/{repo_id}"
    login = "pass --hf-token hf_... or set HF_TOKEN (a token from huggingface.co/settings/tokens)"
    status = _status_code(err)
    if isinstance(err, GatedRepoError) or (status in (401, 403) and not isinstance(err, RepositoryNotFoundError)):
        return (f"{repo_id} is gated ({status}): accept its license on {page} with your account, then {login}")
    if isinstance(err, RevisionNotFoundError):
        return f"{repo_id} has no such revision: see the branches and tags on {page}/tree/main"
    if isinstance(err, RepositoryNotFoundError):
        if status == 401:  # the hub answers 401 for an unknown repo and for a private/gated one without a token
            return (f"{repo_id} was not found on {endpoint} ({status}), or it is private or gated and no valid token "
                    f"was sent: check the owner/name spelling; for a gated model accept its license on {page}, then "
                    f"{login}")
        return f"{repo_id} was not found on {endpoint} ({status}): check the owner/name spelling (case matters)"
    kept = f"; the files already in {out} are kept and not fetched again" if out.is_dir() else ""
    if _is_connection_error(err):
        where = "the hub" if endpoint == DEFAULT_ENDPOINT else f"HF_ENDPOINT={endpoint}"
        return (f"cannot reach {where} to download {repo_id} (offline? a proxy? a wrong HF_ENDPOINT?): "
                f"run the same command again once online{kept}")
    if isinstance(err, HfHubHTTPError):
        return f"the hub answered {status} while downloading {repo_id}: run the same command again to resume{kept}"
    if isinstance(err, OSError) and "Consistency check failed" in str(err):
        return f"a file of {repo_id} arrived incomplete: run the same command again to resume{kept}"
    return None


def _status_code(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _is_connection_error(err: BaseException) -> bool:
    """Whether `err` or an error it was raised from is a failed connection (refused, DNS, timeout, dropped)."""
    kinds: list[type] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("ConnectError", "TimeoutException", "RemoteProtocolError", "NetworkError")),
                          ("httpx", ("ConnectError", "TimeoutException", "RemoteProtocolError", "NetworkError")),
                          ("requests", ("ConnectionError", "Timeout"))):
        loaded = sys.modules.get(module)
        kinds += [getattr(loaded, name) for name in names if loaded is not None and hasattr(loaded, name)]
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

        kinds += [OfflineModeIsEnabled, LocalEntryNotFoundError]  # raised when the hub could not be reached
    except ImportError:
        pass
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, tuple(kinds)):
            return True
        err = err.__cause__ or err.__context__
    return False


def main(argv: list[str]) -> int:
    """`mytune download` argument parsing: prints where the files went and the config override to use them."""
    from mytune.cli.recipes import OneLineParser

    parser = OneLineParser(
        prog="mytune download",
        description="download a model from the Hugging Face hub (safetensors, configs and tokenizer files by default)",
    )
    parser.add_argument("repo_id", metavar="owner/name", help="the hub repo, e.g. meta-llama/Llama-3.2-1B-Instruct")
    parser.add_argument("--output-dir", help="where the files go (default: ./models/<name>); resumes into it")
    parser.add_argument("--hf-token", default=None,
                        help="a hub token for gated or private repos (default: HF_TOKEN or your `hf auth login`)")
    parser.add_argument("--include", nargs="+", action="extend", metavar="PATTERN",
                        help="download only files matching these globs (replaces the default set, e.g. 'original/*')")
    parser.add_argument("--exclude", nargs="+", action="extend", metavar="PATTERN",
                        help="also skip files matching these globs")
    parser.add_argument("--revision", default=None, help="a branch, tag or commit (default: main)")
    args = parser.parse_args(argv)
    out = download(args.repo_id, args.output_dir, token=args.hf_token, include=args.include, exclude=args.exclude,
                   revision=args.revision)
    print(f"downloaded {args.repo_id} to {out}: use it with --override checkpoint_dir={out}")
    return 0
