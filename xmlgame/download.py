"""Downloads for dataset recipes: fetch a URL into a cache folder, unpack archives safely.

Both steps are all-or-nothing. A download streams into a hidden temporary file that is renamed
into place only when complete; an archive is unpacked into a hidden temporary folder that is
renamed into place only when every member is out. A failure leaves no partial file, and no folder
this module created, behind.

Network failures fail fast: connecting times out after ``CONNECT_TIMEOUT`` seconds and a name
that does not resolve fails at once, raising :class:`DownloadError`.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from xmlgame import __version__
from xmlgame.errors import XmlgameError

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # seconds; also the longest wait for one read of the stream
CHUNK_BYTES = 1 << 20

# The opener, a module attribute so tests can replace it (``monkeypatch.setattr``).
urlopen = urllib.request.urlopen


class DownloadError(XmlgameError):
    """A URL could not be fetched (no network, unknown host, HTTP error, broken stream)."""

    def __init__(self, url: str, reason: str):
        self.url = url
        self.reason = reason
        super().__init__(f"could not download {url}: {reason}")


class UnsafeArchiveError(XmlgameError):
    """An archive member would land outside the target folder, or is not a plain file."""


def filename_for(url: str) -> str:
    """The file name a URL's path ends with (``https://host/a/b.tar.gz`` -> ``b.tar.gz``)."""
    name = PurePosixPath(urllib.parse.urlparse(url).path).name
    return urllib.parse.unquote(name) or "download"


def fetch(
    url: str, folder: Path, *, timeout: float = CONNECT_TIMEOUT, progress: bool = True
) -> Path:
    """Download ``url`` into ``folder`` (created on success only) and return the file's path.

    An existing complete file of that name is reused without touching the network.
    """
    folder = Path(folder)
    target = folder / filename_for(url)
    if target.is_file():
        logger.info("using %s (already downloaded)", target)
        return target

    # connect first: nothing is created on disk until the server answers
    response = _connect(url, timeout)
    created = _make_folder(folder)
    tmp = folder / f".{target.name}.part-{uuid.uuid4().hex[:8]}"
    try:
        with response, open(tmp, "wb") as out:
            _stream(url, response, out, progress=progress)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        _remove_empty(created)
        raise
    logger.info("downloaded %s -> %s", url, target)
    return target


def _connect(url: str, timeout: float):
    request = urllib.request.Request(url, headers={"User-Agent": f"xmlgame/{__version__}"})
    try:
        return urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        raise DownloadError(url, f"HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise DownloadError(url, _describe(error.reason)) from None
    except TimeoutError:
        raise DownloadError(url, f"no answer within {timeout:g} s (offline?)") from None
    except (OSError, ValueError) as error:
        raise DownloadError(url, _describe(error)) from None


def _describe(reason) -> str:
    if isinstance(reason, socket.gaierror):
        return f"the host name does not resolve ({reason.strerror}; offline?)"
    if isinstance(reason, TimeoutError):
        return "the connection timed out (offline?)"
    return str(getattr(reason, "strerror", None) or reason)


def _stream(url: str, response, out, *, progress: bool) -> None:
    total = response.headers.get("Content-Length") if hasattr(response, "headers") else None
    total = int(total) if total and total.isdigit() else None
    bar = tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
        desc=filename_for(url), leave=False,
    )
    received = 0
    with bar:
        while True:
            try:
                chunk = response.read(CHUNK_BYTES)
            except OSError as error:  # TimeoutError included
                raise DownloadError(
                    url, f"the stream broke after {received:,} bytes: {error}"
                ) from None
            if not chunk:
                break
            out.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    if total is not None and received != total:
        raise DownloadError(url, f"got {received:,} of {total:,} bytes; try again")


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those created, deepest first."""
    created = []
    path = folder
    while not path.exists():
        created.append(path)
        path = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    return created


def _remove_empty(folders: list[Path]) -> None:
    for path in folders:  # deepest first
        try:
            path.rmdir()
        except OSError:
            break


# --------------------------------------------------------------------------------------------
# archives


def extract(archive: Path, target: Path) -> Path:
    """Unpack a ``.tar``, ``.tar.gz`` or ``.tgz`` archive into ``target`` (all or nothing).

    Members must be plain files or folders whose paths stay inside ``target``: absolute paths,
    ``..`` components, links and device files are refused with :class:`UnsafeArchiveError`.
    """
    archive, target = Path(archive), Path(target)
    if target.exists():
        raise XmlgameError(f"{target} already exists; remove it to unpack {archive.name} again")
    tmp = target.parent / f".{target.name}.unpack-{uuid.uuid4().hex[:8]}"
    created = _make_folder(target.parent)
    try:
        tmp.mkdir()
        with tarfile.open(archive, "r:*") as tar:
            members = [_checked(member, archive) for member in tar.getmembers()]
            for member in tqdm(members, desc=f"unpacking {archive.name}", unit="file", leave=False):
                _extract_member(tar, member, tmp)
        os.replace(tmp, target)
    except tarfile.TarError as error:
        raise XmlgameError(
            f"{archive} is not a readable tar archive ({error}); delete it and download again"
        ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not target.exists():
            _remove_empty(created)
    return target


def _checked(member: tarfile.TarInfo, archive: Path) -> tarfile.TarInfo:
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or member.name.startswith(("/", "\\")):
        raise UnsafeArchiveError(
            f"{archive}: member {member.name!r} would be written outside the target folder; "
            "refusing to unpack this archive"
        )
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(
            f"{archive}: member {member.name!r} is a link or special file; refusing to unpack "
            "this archive (only plain files and folders are allowed)"
        )
    return member


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, root: Path) -> None:
    """Write one checked member under ``root``, with our own permissions (no owners, no modes)."""
    destination = root.joinpath(*PurePosixPath(member.name).parts)
    if member.isdir():
        destination.mkdir(parents=True, exist_ok=True)
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    source = tar.extractfile(member)
    with source, open(destination, "wb") as out:
        shutil.copyfileobj(source, out, CHUNK_BYTES)
