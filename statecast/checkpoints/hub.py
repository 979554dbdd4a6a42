"""Fetching checkpoints from the Hugging Face Hub (only config, weights and tokenizer files).

Uses huggingface_hub's own cache (``HF_HOME``), progress bars and offline mode
(``HF_HUB_OFFLINE=1`` resolves from the cache). Only one weight format is fetched:
safetensors when the repo has it, otherwise ``pytorch_model*.bin``, otherwise ``*.pth``.

What a broken or hostile Hub cannot do (each a one-line :class:`StatecastError`):

* hang ``pull``: every request (listing, metadata, download) waits at most
  ``STATECAST_HUB_TIMEOUT`` seconds (default 60) for the next bytes; huggingface_hub's own
  resumes of an interrupted download each get that timeout too;
* slip in other bytes: every Git LFS file is hashed after download and compared with the
  sha256 the Hub lists for it (and the cache blob is named by); a mismatch removes the blob
  from the cache (a retry downloads it again) and names the file;
* write outside the cache: a listing with an absolute name or a ``..`` component is refused
  before anything is downloaded;
* be mistaken for an offline cache miss: an HTTP error names its status and file, a refused
  connection names the endpoint.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StatecastError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")

CONFIG_PATTERNS = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "20B_tokenizer.json"]
WEIGHT_PATTERNS = {
    "safetensors": ["*.safetensors", "model.safetensors.index.json"],
    "bin": ["pytorch_model*.bin", "pytorch_model.bin.index.json"],
    "pth": ["*.pth"],
}

TIMEOUT_ENV = "STATECAST_HUB_TIMEOUT"
DEFAULT_TIMEOUT = 60.0  # seconds without a byte from the Hub before a request is given up


def looks_like_repo_id(source: str) -> bool:
    return bool(REPO_ID.match(source)) and not Path(source).exists()


@dataclass
class Snapshot:
    repo_id: str
    revision: str  # as asked ("main" by default)
    sha: str  # the commit the revision resolved to
    path: Path  # local snapshot directory in the HF cache
    sha256: dict[str, str] = field(default_factory=dict)  # path in repo -> sha256, for the LFS files checked


def hub_timeout() -> float:
    """Seconds to wait for the Hub's next bytes: ``$STATECAST_HUB_TIMEOUT`` or 60."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise StatecastError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}")
    return value


def _weight_kind(filenames: list[str]) -> str:
    names = [f.rsplit("/", 1)[-1] for f in filenames]
    if any(n.endswith(".safetensors") for n in names):
        return "safetensors"
    if any(n.startswith("pytorch_model") and n.endswith(".bin") for n in names):
        return "bin"
    if any(n.endswith(".pth") for n in names):
        return "pth"
    raise StatecastError("the repo has no weights statecast can read (.safetensors, pytorch_model*.bin or .pth)")


def unsafe_repo_path(name: str) -> bool:
    """A Hub file name that would leave the snapshot directory: absolute, a drive or a
    backslash (Windows), a NUL, or a ``..`` component."""
    if not name or name.startswith("/") or "\\" in name or "\0" in name or re.match(r"^[A-Za-z]:", name):
        return True
    return ".." in name.split("/")


def _check_listing(repo_id: str, revision: str, names: list[str]) -> None:
    for name in names:
        if not isinstance(name, str) or unsafe_repo_path(name):
            raise StatecastError(f"Hub repo {repo_id}@{revision} lists a file outside the repo, {name!r} "
                                 "(an absolute path or one with '..'); refusing to download from it")


@contextlib.contextmanager
def _bounded_requests(timeout: float):
    """Every request huggingface_hub makes in this block waits at most ``timeout`` seconds to
    connect and between bytes. huggingface_hub passes ``timeout=None`` (wait forever) to some
    calls (``repo_info``, tree listings), so the bound is put on each request by a hook of its
    shared HTTP client rather than on the calls."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    bound = {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}

    def hook(request) -> None:
        request.extensions = {**request.extensions, "timeout": dict(bound)}

    set_factory = getattr(_http, "set_client_factory", None)
    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) or getattr(_http, "default_client_factory", None)

    def factory():
        client = previous()
        hooks = client.event_hooks
        client.event_hooks = {"request": [*hooks.get("request", []), hook], "response": list(hooks.get("response", []))}
        return client

    saved = (constants.HF_HUB_DOWNLOAD_TIMEOUT, constants.HF_HUB_ETAG_TIMEOUT)
    constants.HF_HUB_DOWNLOAD_TIMEOUT = constants.HF_HUB_ETAG_TIMEOUT = timeout
    if set_factory is not None and previous is not None:
        set_factory(factory)
    try:
        yield
    finally:
        constants.HF_HUB_DOWNLOAD_TIMEOUT, constants.HF_HUB_ETAG_TIMEOUT = saved
        if set_factory is not None and previous is not None:
            set_factory(previous)


@contextlib.contextmanager
def quiet():
    """No progress bars and no warnings (such as "trying to resume download") from
    huggingface_hub in this block: for ``pull --quiet`` / ``--json``, where stderr carries only
    statecast's one-line error."""
    import logging
    import warnings

    from huggingface_hub.utils import logging as hf_logging

    logger = hf_logging.get_logger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    except ImportError:  # pragma: no cover - older huggingface_hub
        disable_progress_bars = enable_progress_bars = None
    reenable = False
    if disable_progress_bars is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # HF_HUB_DISABLE_PROGRESS_BARS=0 has priority: it says so
            reenable = not are_progress_bars_disabled()
            disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if reenable:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                enable_progress_bars()


def download(repo_id: str, revision: str | None = None, progress: bool = True) -> Snapshot:
    """Fetch (or find in the cache) the files of ``repo_id`` that conversion needs; every Git
    LFS file is checked against its sha256. ``progress=False``: no progress bars or warnings
    from huggingface_hub."""
    import huggingface_hub as hh
    from huggingface_hub import constants

    revision = revision or "main"
    timeout = hub_timeout()
    lfs: dict[str, str] = {}
    try:
        with _bounded_requests(timeout), (contextlib.nullcontext() if progress else quiet()):
            if constants.HF_HUB_OFFLINE:
                path, patterns = _from_cache(hh, repo_id, revision)
            else:
                info = hh.HfApi().model_info(repo_id, revision=revision, files_metadata=True, timeout=timeout)
                siblings = info.siblings or []
                _check_listing(repo_id, revision, [s.rfilename for s in siblings])
                kind = _weight_kind([s.rfilename for s in siblings])
                patterns = CONFIG_PATTERNS + WEIGHT_PATTERNS[kind]
                lfs = {s.rfilename: s.lfs.sha256 for s in siblings if getattr(s, "lfs", None) is not None}
                path = Path(hh.snapshot_download(repo_id, revision=revision, etag_timeout=timeout, allow_patterns=patterns))
    except StatecastError:
        raise
    except Exception as e:  # noqa: BLE001 - translated when recognised, re-raised otherwise
        translated = hub_error(e, repo_id, revision, timeout)
        if translated is None:
            raise
        raise translated from None
    sha256 = verify_snapshot(repo_id, revision, path, lfs, patterns)
    return Snapshot(repo_id=repo_id, revision=revision, sha=path.name, path=path, sha256=sha256)


def _chain(e: BaseException):
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _url_of(e: BaseException) -> str | None:
    for attr in ("request", "response"):
        try:
            obj = getattr(e, attr, None)
        except RuntimeError:  # httpx: ".request property has not been set"
            obj = None
        url = getattr(obj, "url", None)
        if url is not None:
            return str(url)
    return None


def _doing(url: str | None) -> str:
    """What a request was for: 'downloading FILE of' (``.../resolve/REV/FILE``) or 'listing'."""
    from urllib.parse import unquote

    m = re.search(r"/resolve/[^/]+/([^?]+)", url or "")
    return f"downloading {unquote(m.group(1))} of" if m else "listing"


def hub_error(e: BaseException, repo_id: str, revision: str, timeout: float) -> StatecastError | None:
    """The one-line error for an exception out of huggingface_hub, or None if not recognised.
    The whole ``__cause__``/``__context__`` chain is read: huggingface_hub wraps a timeout, a
    refused connection or an HTTP error of the Hub into "not in the local cache" errors."""
    from huggingface_hub import constants
    from huggingface_hub import errors as he

    endpoint = constants.ENDPOINT.rstrip("/")
    where = f"{repo_id}@{revision}"
    chain = list(_chain(e))

    def first(types):
        return next((x for x in chain if isinstance(x, types)), None)

    try:
        import httpx2 as httpx
    except ImportError:  # older huggingface_hub
        try:
            import httpx
        except ImportError:
            httpx = None
    timeout_types = (TimeoutError,) + ((httpx.TimeoutException,) if httpx else ())
    transport_types = (ConnectionError,) + ((httpx.TransportError,) if httpx else ())

    if first(he.RevisionNotFoundError):
        return StatecastError(f"unknown revision {revision!r} for Hub repo {repo_id!r}")
    if first((he.RepositoryNotFoundError, he.GatedRepoError)):
        return StatecastError(f"unknown Hub repo {repo_id!r} (or it is private or gated: log in with `hf auth login`)")
    offline = f"{where} is not in the Hugging Face cache and the Hub is offline (HF_HUB_OFFLINE=1 or no network)"
    if constants.HF_HUB_OFFLINE or first(he.OfflineModeIsEnabled):
        return StatecastError(offline)
    if (x := first(timeout_types)) is not None:
        return StatecastError(f"the Hub at {endpoint} sent nothing for {timeout:g} s while {_doing(_url_of(x))} {where}; "
                              f"giving up ({TIMEOUT_ENV}={timeout:g}: raise it to wait longer)")
    if (x := first(he.HfHubHTTPError)) is not None and getattr(x, "response", None) is not None:
        status = x.response.status_code
        reason = getattr(x.response, "reason_phrase", "") or ""
        return StatecastError(f"HTTP {status}{' ' + reason if reason else ''} from the Hub at {endpoint} while "
                              f"{_doing(_url_of(x))} {where}")
    if (x := first(transport_types)) is not None:
        detail = (str(x).splitlines() or [type(x).__name__])[0]
        return StatecastError(f"cannot reach the Hub at {endpoint} for {where}: {detail}")
    if first(he.LocalEntryNotFoundError):
        return StatecastError(offline)
    if (x := first(he.HfHubHTTPError)) is not None:
        return StatecastError(f"Hub request for {where} failed: {(str(x).splitlines() or [''])[0]}")
    if (x := first(OSError)) is not None:
        if x.errno is not None and x.strerror:
            name = f": {x.filename}" if x.filename else ""
            return StatecastError(f"downloading {where} failed: {x.strerror}{name}")
        return StatecastError(f"downloading {where} failed: {(str(x).splitlines() or [type(x).__name__])[0]}")
    return None


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def verify_snapshot(repo_id: str, revision: str, snapshot: Path, lfs: dict[str, str],
                    patterns: list[str] | None = None) -> dict[str, str]:
    """Hash every Git LFS file of ``snapshot`` (of those matching ``patterns``: the ones used)
    once and compare it with the sha256 the Hub lists (``lfs``: path in repo -> sha256) and the
    one its cache blob is named by. A mismatch removes the blob and its link from the cache (so
    the next pull downloads it again) and is an error naming the file. Returns path in repo -> verified sha256."""
    expected: dict[str, str] = {}
    for f in sorted(snapshot.rglob("*")):
        if not f.is_file():
            continue
        rel = f.relative_to(snapshot).as_posix()
        if patterns is not None and not any(fnmatch.fnmatch(rel, p) for p in patterns):
            continue
        blob = f.resolve()
        claims = {c for c in (lfs.get(rel), blob.name if blob.parent.name == "blobs" else None) if c and SHA256.match(c)}
        if len(claims) > 1:
            _drop(f, blob)
            raise StatecastError(f"{repo_id}@{revision}: {rel} is cached as blob {blob.name} but the Hub lists sha256 "
                                 f"{lfs[rel]}; removed it from the cache, pull again to download it")
        if claims:
            expected[rel] = claims.pop()
    verified: dict[str, str] = {}
    for rel, want in expected.items():
        f = snapshot / rel
        got = _sha256_of(f)
        if got != want:
            _drop(f, f.resolve())
            raise StatecastError(f"{repo_id}@{revision}: the downloaded {rel} does not match the sha256 the Hub lists for it "
                                 f"(expected {want}, got {got}); removed it from the cache, pull again to download it")
        verified[rel] = got
    return verified


def _drop(link: Path, blob: Path) -> None:
    for p in (blob, link):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StatecastError(f"cannot remove the bad download {p} from the Hugging Face cache: {e.strerror}") from None


def _from_cache(hh, repo_id: str, revision: str) -> tuple[Path, list[str]]:
    """Offline: the cached snapshot whose files of one weight kind are complete, and the
    patterns of the files used from it."""
    from huggingface_hub import errors as he

    from .readers import weight_files

    error: Exception | None = None
    for patterns in WEIGHT_PATTERNS.values():
        try:
            path = Path(hh.snapshot_download(repo_id, revision=revision, allow_patterns=CONFIG_PATTERNS + patterns))
        except he.LocalEntryNotFoundError as e:  # that kind is not (completely) cached
            error = e
            continue
        if weight_files(path):
            return path, CONFIG_PATTERNS + patterns
    raise error or he.LocalEntryNotFoundError(f"{repo_id}@{revision} has no cached weights")
