"""Where experiments live: a local folder, an NFS mount or an object store (`s3://`, `gs://`), all
through pyarrow filesystems, so the driver, every trial and the export read and write the same files.
Endpoints and credentials come from the usual environment variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, ...), as pyarrow reads them. `Store` gives the method's
LoftQ cache that reach."""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from llmm_tune.errors import UsageError


def is_uri(location: str) -> bool:
    return "://" in str(location)


def resolve(location: str | os.PathLike) -> str:
    """An absolute local path, or the URI as given."""
    location = str(location)
    return location.rstrip("/") if is_uri(location) else str(Path(location).expanduser().resolve())


def join(location: str, *parts: str) -> str:
    return posixpath.join(location, *parts) if is_uri(location) else str(Path(location, *parts))


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a local path or URI."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), resolve(location)
    return pafs.FileSystem.from_uri(location)


def exists(location: str) -> bool:
    return _found(*filesystem(location))


def checkpoint_exists(checkpoint) -> bool:
    """Whether a Ray checkpoint's folder is still on its filesystem."""
    return _found(checkpoint.filesystem, checkpoint.path)


def _found(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str) -> str:
    return read_bytes(location).decode()


def write_bytes(location: str, data: bytes) -> None:
    """Write a file; local files atomically (temporary name, then rename); object stores write whole
    objects, which is atomic already."""
    if not is_uri(location):
        from llmm_tune.files import atomic_path

        with atomic_path(location) as tmp:
            tmp.write_bytes(data)
        return
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode())


def list_names(location: str) -> list[str]:
    """Names directly inside a folder (empty when it does not exist)."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    return [posixpath.basename(info.path) for info in fs.get_file_info(pafs.FileSelector(path))]


def delete(location: str) -> None:
    fs, path = filesystem(location)
    fs.delete_file(path)


def mend_cut_state(experiment: str) -> None:
    """Put back a whole copy of Tune's newest experiment state where a kill cut it. Tune writes its state in the
    driver's staging folder (in Ray's session folder) and copies it into the experiment in place (pyarrow's copy), so
    a search killed during the copy leaves a cut file that Tune cannot resume nor ExperimentAnalysis read; the staged
    copy, written whole before the copy began, stays on the driver's disk. A cut file without one is an error that
    says so."""
    states = sorted(name for name in list_names(experiment)
                    if name.startswith("experiment_state-") and name.endswith(".json"))
    if not states or _whole_json(read_bytes(join(experiment, states[-1]))):
        return
    name = posixpath.basename(experiment.rstrip("/"))
    staged = [path for path in Path(ray_temp_dir()).glob(f"session_*/artifacts/*/{name}/driver_artifacts/{states[-1]}")
              if _whole_json(path.read_bytes())]
    if not staged:
        raise UsageError(f"{join(experiment, states[-1])} was cut by a kill while Tune copied it, and no whole copy is "
                         f"left in Ray's session folders ({ray_temp_dir()}) of this machine; run the search from its "
                         "driver's machine, or start it again under another --name")
    write_bytes(join(experiment, states[-1]), max(staged, key=lambda path: path.stat().st_mtime).read_bytes())
    print(f"{states[-1]} of {experiment} was cut by a kill while Tune copied it; put back its whole staged copy")


def ray_temp_dir() -> str:
    """Ray's temporary folder on this machine, where each session stages its files (/tmp/ray unless RAY_TMPDIR or
    TMPDIR say otherwise): Ray's own default, read without starting Ray."""
    from ray._common.utils import get_default_ray_temp_dir

    return get_default_ray_temp_dir()


def _whole_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Store:
    """A LoftQ store (`llmm_tune.method.loftq.LoftQStore`) at any location, so that every trial of a search
    reads the initialisation the first one computed: `apply_llmm(..., loftq_cache=Store(location))`."""

    location: str

    def read(self, name: str) -> bytes | None:
        path = join(self.location, name)
        return read_bytes(path) if exists(path) else None

    def write(self, name: str, data: bytes) -> None:
        write_bytes(join(self.location, name), data)


def writable(location: str, flag: str) -> str:
    """`location` resolved (an absolute path or the URI), once a probe file was written there; a
    UsageError naming the fix when it cannot be."""
    location = resolve(location)
    probe = join(location, ".llmm_write_test")
    try:
        if not is_uri(location):
            Path(location).mkdir(parents=True, exist_ok=True)
        write_bytes(probe, b"")
        delete(probe)
    except (OSError, pa.ArrowException) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        fix = ("check the bucket, AWS_ENDPOINT_URL and the credentials" if is_uri(location)
               else "choose a folder you can write to")
        raise UsageError(f"{flag} {location} is not writable ({reason}); {fix}") from None
    return location
