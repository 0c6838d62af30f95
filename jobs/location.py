"""An output location on any fsspec filesystem (a local directory, s3://bucket/prefix): the few storage
operations the job's bookkeeping needs, with the same guarantees on a local disk and on S3.

  * whole-object writes: a reader sees the old content or the new, never a mix (temp file + rename on a
    disk; a single PUT on S3, where objects appear whole or not at all);
  * exclusive create: O_EXCL on a disk, `If-None-Match: *` on S3 (s3fs mode="create");
  * compare-and-swap: replace an object only if it still holds what we read (rename it aside, check it,
    create the new one with O_EXCL on a disk; `If-Match: <etag>` on S3);
  * fresh listings: s3fs caches directory listings, and a cached listing taken before a write misses the
    files the write added.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid

from jobs.errors import JobInputError


class LocationError(JobInputError):
    """The output location cannot be used (not writable, a file where a folder should be, bad URI)."""


class Location:
    def __init__(self, uri: str):
        import fsspec

        from jobs.ray_runtime import storage_options_for

        try:
            self.fs, root = fsspec.core.url_to_fs(uri, **storage_options_for(uri))
        except (ValueError, ImportError) as e:  # fsspec: "Protocol not known: ..."
            raise LocationError(f"--out {uri}: {e}") from None
        self.uri = uri.rstrip("/") or uri
        self.root = root.rstrip("/") or root
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        self.local = "file" in protocols or "local" in protocols

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def url(self, name: str) -> str:
        return f"{self.uri}/{name}"

    # ---- reading

    def names(self) -> list[str]:
        """Every file under the location, as paths relative to it, from a fresh listing."""
        self.fs.invalidate_cache()
        if self.local and os.path.isfile(self.root):
            raise LocationError(f"--out {self.uri} is a file, not a folder")
        if not self.fs.exists(self.root):
            return []
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix):] for p in self.fs.find(self.root) if p.startswith(prefix))

    def read(self, name: str) -> bytes | None:
        """The object's bytes, or None when there is none."""
        try:
            return self.fs.cat_file(self.path(name))
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raise LocationError(f"{self.url(name)} is a folder, where invardiff keeps a file") from None

    # ---- writing

    def prepare(self) -> None:
        """Make the folder on a local disk (object stores have none to make)."""
        if not self.local:
            return
        if os.path.isfile(self.root):
            raise LocationError(f"--out {self.uri} is a file, not a folder")
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise LocationError(f"--out {self.uri} cannot be created ({e.strerror or e})") from None

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Write `name` only if no object of that name exists; False if one does."""
        path = self.path(name)
        if self.local:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            return True
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        finally:
            self.fs.invalidate_cache(path)
        return True

    def replace(self, name: str, data: bytes) -> None:
        """Write `name` whole, replacing what is there."""
        path = self.path(name)
        if not self.local:
            self.fs.pipe_file(path, data)
            self.fs.invalidate_cache(path)
            return
        temporary = self._temporary(name)
        try:
            with open(temporary, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)  # atomic on one filesystem
        except BaseException:
            with contextlib.suppress(OSError):  # the original error is the one worth raising
                os.remove(temporary)
            raise

    def swap(self, name: str, expected: bytes, data: bytes) -> bool:
        """Replace `name` with `data` only if it still holds `expected`; False if it changed or vanished.

        On S3 the check and the write are one conditional PUT (`If-Match: <etag>`). On a disk the current file
        is renamed aside (of several racing processes only one can), checked, and the new one created with
        O_EXCL, so a process that found the name free in between wins rather than being overwritten."""
        path = self.path(name)
        if not self.local:
            etag = self._etag(path)
            current = self.read(name)
            # The ETag read before and after the content is the same only if the content we checked is what
            # that ETag names: the conditional PUT below then replaces exactly what we checked.
            if etag is None or current != expected or self._etag(path) != etag:
                return False
            try:
                self.fs.pipe_file(path, data, IfMatch=etag)
            except FileNotFoundError:
                return False
            except OSError as e:
                if "pre-condition" in str(e) or "PreconditionFailed" in str(e):
                    return False
                raise
            finally:
                self.fs.invalidate_cache(path)
            return True
        aside = self._temporary(name)
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        try:
            with open(aside, "rb") as file:
                displaced = file.read()
            if displaced != expected:
                # It changed between our read and our rename: put it back, unless a third process already
                # created a new one (the one we displaced then finds out at its next heartbeat).
                with contextlib.suppress(FileExistsError):
                    os.link(aside, path)
                return False
            return self.create_exclusive(name, data)
        finally:
            os.remove(aside)

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(name))
        self.fs.invalidate_cache(self.path(name))

    def _etag(self, path: str) -> str | None:
        self.fs.invalidate_cache(path)
        try:
            return self.fs.info(path).get("ETag")
        except FileNotFoundError:
            return None

    def _temporary(self, name: str) -> str:
        # Hidden (dot-prefixed), so no reader takes it for data, and named after what it stands in for.
        folder, base = posixpath.split(self.path(name))
        return posixpath.join(folder, f".{base}.{uuid.uuid4().hex}.tmp")
