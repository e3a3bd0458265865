"""Where the weights come from: the Hugging Face Hub, or a local copy of the five repos. Both list
a repo's files with their sizes and fetch one file at a time into a repo folder."""

import json
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError
from huggingface_hub.hf_api import RepoFile
from tqdm import tqdm

from ...components import HUB_REPOS
from ...files import written_atomically

HUB_URL = "https://huggingface.co"
COPY_CHUNK = 8 << 20


class DownloadError(RuntimeError):
    """The weights could not be fetched or converted; the message says why and what to do."""


@dataclass(frozen=True)
class SourceFile:
    """A file as a source lists it."""

    size: int
    sha256: Optional[str] = None  # published by the Hub for large (LFS) files


class LocalSource:
    """The five repos as sub-folders of a local folder (a mirror, a pre-downloaded snapshot)."""

    def __init__(self, root):
        self.root = Path(root)

    def __str__(self):
        return str(self.root)

    def list_files(self, repo) -> dict:
        folder = self.root / repo
        if not folder.is_dir():
            raise DownloadError(
                f"{folder} does not exist: --from expects one sub-folder per repo ({', '.join(HUB_REPOS)})"
            )
        # is_file() and stat() follow links, so Hub cache snapshots (links to blobs) work too.
        return {p.relative_to(folder).as_posix(): SourceFile(p.stat().st_size) for p in folder.rglob("*") if p.is_file()}

    def fetch(self, repo, path, repo_dir) -> Path:
        source, target = self.root / repo / path, Path(repo_dir) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        with written_atomically(target) as partial, open(source, "rb") as src, open(partial, "wb") as dst:
            with tqdm(total=source.stat().st_size, unit="B", unit_scale=True, desc=path, leave=False) as bar:
                while chunk := src.read(COPY_CHUNK):
                    dst.write(chunk)
                    bar.update(len(chunk))
        return target


class HubSource:
    """The five repos on the Hugging Face Hub, read with `token` (the gated DeepFloyd repo needs one)."""

    def __init__(self, token=None):
        self.token = token

    def __str__(self):
        return "the Hugging Face Hub"

    def list_files(self, repo) -> dict:
        with self._explained_errors(HUB_REPOS[repo]):
            return hub_list_files(HUB_REPOS[repo], self.token)

    def fetch(self, repo, path, repo_dir) -> Path:
        with self._explained_errors(HUB_REPOS[repo]):
            return hub_download_file(HUB_REPOS[repo], path, repo_dir, self.token)

    @contextmanager
    def _explained_errors(self, repo_id):
        try:
            yield
        except HfHubHTTPError as error:
            # Without a token the Hub answers 401 for a gated repo (huggingface_hub then raises
            # RepositoryNotFoundError); with one that has not accepted the licence, GatedRepoError.
            licence_missing = isinstance(error, GatedRepoError)
            if licence_missing or error.response.status_code in (401, 403):
                raise DownloadError(access_refused_message(repo_id, self.token is not None, licence_missing)) from error
            raise DownloadError(f"Fetching from {repo_id} failed: {error}\nRun the command again to resume.") from error


def access_refused_message(repo_id, token_set, licence_missing) -> str:
    """What to do when the Hub refuses a repo: for the gated DeepFloyd repo, a token of an account
    that accepted its licence."""
    url = f"{HUB_URL}/{repo_id}"
    if not token_set:
        cause = f"{repo_id} is a gated repo and no Hugging Face token is set (HF_TOKEN is empty)."
    elif licence_missing:
        cause = f"The account of the token in HF_TOKEN has not accepted the licence of the gated repo {repo_id}."
    else:
        cause = f"The Hub refused the token in HF_TOKEN for {repo_id}: it is invalid or expired, or its account has no access."
    return (
        f"{cause}\nTo fix it: accept the licence at {url} while logged in to the Hub, create a read token at "
        f"{HUB_URL}/settings/tokens and run again with HF_TOKEN=<that token>. HF_TOKEN must be a token of an "
        "account that accepted the licence."
    )


def hub_list_files(repo_id, token) -> dict:
    """Every file of a Hub repo with its size. Checks access first, so that a gated repo fails in
    seconds rather than after the other repos' gigabytes."""
    api = HfApi(token=token)
    api.auth_check(repo_id)
    return {
        item.path: SourceFile(item.size, item.lfs.sha256 if item.lfs else None)
        for item in api.list_repo_tree(repo_id, recursive=True)
        if isinstance(item, RepoFile)
    }


def hub_download_file(repo_id, path, repo_dir, token) -> Path:
    """Downloads one file to repo_dir/path. huggingface_hub keeps partial downloads under
    repo_dir/.cache and resumes them, and shows a progress bar."""
    return Path(hf_hub_download(repo_id, path, local_dir=repo_dir, token=token))


def read_source_json(source, repo, path):
    """A small JSON file of a source (a sharded checkpoint's index), fetched to a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(source.fetch(repo, path, tmp).read_text())
