"""Fetching checkpoints from the Hugging Face Hub (only config, weights and tokenizer files).

Uses huggingface_hub's own cache (``HF_HOME``), progress bars and offline mode
(``HF_HUB_OFFLINE=1`` resolves from the cache). Only one weight format is fetched:
safetensors when the repo has it, otherwise ``pytorch_model*.bin``, otherwise ``*.pth``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import StatecastError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

CONFIG_PATTERNS = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "20B_tokenizer.json"]
WEIGHT_PATTERNS = {
    "safetensors": ["*.safetensors", "model.safetensors.index.json"],
    "bin": ["pytorch_model*.bin", "pytorch_model.bin.index.json"],
    "pth": ["*.pth"],
}


def looks_like_repo_id(source: str) -> bool:
    return bool(REPO_ID.match(source)) and not Path(source).exists()


@dataclass
class Snapshot:
    repo_id: str
    revision: str  # as asked ("main" by default)
    sha: str  # the commit the revision resolved to
    path: Path  # local snapshot directory in the HF cache


def _weight_kind(filenames: list[str]) -> str:
    names = [f.rsplit("/", 1)[-1] for f in filenames]
    if any(n.endswith(".safetensors") for n in names):
        return "safetensors"
    if any(n.startswith("pytorch_model") and n.endswith(".bin") for n in names):
        return "bin"
    if any(n.endswith(".pth") for n in names):
        return "pth"
    raise StatecastError("the repo has no weights statecast can read (.safetensors, pytorch_model*.bin or .pth)")


def download(repo_id: str, revision: str | None = None) -> Snapshot:
    """Fetch (or find in the cache) the files of ``repo_id`` that conversion needs."""
    import huggingface_hub as hh
    from huggingface_hub import constants
    from huggingface_hub import errors as he

    revision = revision or "main"
    try:
        if constants.HF_HUB_OFFLINE:
            path = _from_cache(hh, he, repo_id, revision)
        else:
            info = hh.HfApi().model_info(repo_id, revision=revision)
            kind = _weight_kind([s.rfilename for s in info.siblings or []])
            path = Path(hh.snapshot_download(repo_id, revision=revision, allow_patterns=CONFIG_PATTERNS + WEIGHT_PATTERNS[kind]))
    except he.RevisionNotFoundError:
        raise StatecastError(f"unknown revision {revision!r} for Hub repo {repo_id!r}") from None
    except he.RepositoryNotFoundError:
        raise StatecastError(f"unknown Hub repo {repo_id!r} (or it is private or gated: log in with `hf auth login`)") from None
    except (he.LocalEntryNotFoundError, he.OfflineModeIsEnabled):
        raise StatecastError(f"{repo_id}@{revision} is not in the Hugging Face cache and the Hub is offline (HF_HUB_OFFLINE=1 or no network)") from None
    except he.HfHubHTTPError as e:
        raise StatecastError(f"Hub request for {repo_id}@{revision} failed: {str(e).splitlines()[0]}") from None
    except OSError as e:  # connection refused, DNS...
        raise StatecastError(f"cannot reach the Hub at {constants.ENDPOINT} for {repo_id}: {e}") from None
    return Snapshot(repo_id=repo_id, revision=revision, sha=path.name, path=path)


def _from_cache(hh, he, repo_id: str, revision: str) -> Path:
    """Offline: the cached snapshot whose files of one weight kind are complete."""
    from .readers import weight_files

    error: Exception | None = None
    for patterns in WEIGHT_PATTERNS.values():
        try:
            path = Path(hh.snapshot_download(repo_id, revision=revision, allow_patterns=CONFIG_PATTERNS + patterns))
        except he.LocalEntryNotFoundError as e:  # that kind is not (completely) cached
            error = e
            continue
        if weight_files(path):
            return path
    raise error or he.LocalEntryNotFoundError(f"{repo_id}@{revision} has no cached weights")
