"""A versioned plan store on any fsspec filesystem (a local directory or s3://bucket/prefix).

    STORE/
      <key>/                              one key per (model fingerprint, pipeline signature)
        signature.json                    the signature the key stands for (informative; the key is its hash)
        plans/<created>-<plan_id>.json    every plan ever written, never overwritten
        reports/<created>-<plan_id>-drift.md / .png   drift against the plan that was latest at the time
        latest.json                       pointer: which version `generate --plan latest` uses

The pointer moves only after the new plan was written, read back and validated, and it is written in one piece:
a rename on a local disk, a single PUT on S3 (objects appear whole or not at all). A crash at any point leaves
the previous pointer in place. Readers also check the pointer's checksum against the plan it names.

Moving the pointer is a compare-and-swap: `promote(version, replacing=plan)` moves it only if it still names
`plan` (the one the new version was compared with; None: only if there is no pointer yet). Of two refreshes of
one key racing, the second finds the pointer moved and gets a PromotionConflict naming the winner; its version
stays in the store, unpromoted. On S3 the swap is one conditional PUT (`If-Match` / `If-None-Match: *`, as the
output lease, jobs/location.py); on a local disk the check and the rename run under an flock on a hidden lock
file, which the kernel releases if the process dies, and readers, which take no lock, still see the old pointer
or the new, never none.

Credentials are never passed in or stored: s3fs reads them from the standard AWS environment variables.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import posixpath
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import fsspec

from invardiff.plan import PipelineSignature, Plan, PlanError
from jobs.errors import JobInputError

POINTER_FORMAT = "invardiff-plan-pointer/1"
# What version_name() makes: a pointer naming anything else (a path, "..") is refused, so a tampered pointer can
# never make a reader open a file outside its key's plans/ folder.
VERSION_NAME = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{12}$")
LATEST = "latest.json"
POINTER_LOCK = ".latest.json.lock"  # local disks only: serialises pointer swaps (hidden: not a version, not a key)
PROMOTE_ATTEMPTS = 5  # swaps lost to a writer that left the pointer naming the same plan (a re-promotion): retried
STORE_ENV = "INVARDIFF_PLAN_STORE"


class StoreError(JobInputError):
    """A store that cannot be used as asked: unknown URI, unreachable bucket, missing or corrupt latest pointer."""


class PromotionConflict(StoreError):
    """The pointer moved (another refresh promoted) since the plan being promoted was compared with it."""


def store_key(signature: PipelineSignature) -> str:
    """``<arch>-<fingerprint 12>-<signature hash 10>``: readable enough to tell models apart in a listing, and
    different for any signature field that `Plan.check_compatible` compares (model_id is informative only)."""
    fields = {k: v for k, v in signature.to_dict().items() if k != "model_id"}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    fingerprint = signature.model_fingerprint.removeprefix("sha256:")
    return f"{signature.architecture}-{fingerprint[:12]}-{digest[:10]}"


def version_name(plan: Plan) -> str:
    stamp = datetime.fromisoformat(plan.created_at.replace("Z", "+00:00")).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{plan.plan_id}"


@dataclass(frozen=True, order=True)  # names start with the creation time: sorting is chronological
class Version:
    key: str
    name: str  # <created>-<plan_id>

    @property
    def plan_id(self) -> str:
        return self.name.rsplit("-", 1)[-1]

    @property
    def relpath(self) -> str:
        return f"plans/{self.name}.json"


@dataclass(frozen=True)
class Pointer:
    key: str
    version: str
    plan_id: str
    checksum: str
    promoted_at: str


class PlanStore:
    def __init__(self, uri: str, storage_options: dict | None = None):
        if not uri:
            raise StoreError("no plan store given: pass --store DIR_OR_URI or set $INVARDIFF_PLAN_STORE")
        if storage_options is None:
            from jobs.ray_runtime import storage_options_for

            storage_options = storage_options_for(uri)
        try:
            self.fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        except (ValueError, ImportError) as e:  # fsspec: "Protocol not known: ..."
            raise StoreError(f"plan store {uri!r}: {e}") from None
        self.uri = uri.rstrip("/")
        self.root = root.rstrip("/")
        self.local = "file" in _protocols(self.fs)

    # ---- paths

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def url(self, *parts: str) -> str:
        return "/".join([self.uri, *parts])

    # ---- checks

    def check_reachable(self, *, create: bool = False) -> None:
        """Fail early, before a long calibration, if the store cannot be used (missing bucket, bad endpoint)."""
        try:
            if self.local and create:
                self.fs.makedirs(self.root, exist_ok=True)
            elif self.local and not self.fs.exists(self.root):
                raise StoreError(f"plan store {self.uri!r} does not exist")
            elif not self.local:
                bucket = self.root.split("/", 1)[0]
                if not self.fs.exists(bucket):
                    raise StoreError(f"plan store {self.uri!r}: bucket {bucket!r} does not exist or is not readable")
        except StoreError:
            raise
        except Exception as e:  # credentials, endpoint, permissions: one clear line, no traceback
            raise StoreError(f"plan store {self.uri!r} is not reachable: {type(e).__name__}: {e}") from None

    # ---- reading

    def keys(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        entries = self.fs.ls(self.root, detail=True)
        return sorted(
            posixpath.basename(e["name"].rstrip("/"))
            for e in entries
            if e["type"] == "directory" and self.fs.exists(posixpath.join(e["name"], "signature.json"))
        )

    def signature(self, key: str) -> PipelineSignature:
        return PipelineSignature.from_dict(json.loads(self.fs.cat_file(self._path(key, "signature.json"))))

    def versions(self, key: str) -> list[Version]:
        folder = self._path(key, "plans")
        if not self.fs.exists(folder):
            return []
        names = [posixpath.basename(p) for p in self.fs.ls(folder, detail=False)]
        return sorted(Version(key, n.removesuffix(".json")) for n in names if n.endswith(".json") and not n.startswith("."))

    def pointer(self, key: str) -> Pointer | None:
        return self._decode_pointer(key, self._pointer_bytes(key))

    def _pointer_bytes(self, key: str) -> bytes | None:
        path = self._path(key, LATEST)
        self.fs.invalidate_cache(path)  # s3fs caches listings: a pointer another process moved must be seen
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raise StoreError(f"plan store {self.uri}: latest pointer of key {key} is a folder, not a file") from None
        except OSError as e:
            raise StoreError(f"plan store {self.uri}: latest pointer of key {key} cannot be read ({e})") from None

    def _decode_pointer(self, key: str, data: bytes | None) -> Pointer | None:
        if data is None:
            return None
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != POINTER_FORMAT:
                raise ValueError(f"format {doc.get('format') if isinstance(doc, dict) else None!r}")
            pointer = Pointer(**{k: doc[k] for k in ("key", "version", "plan_id", "checksum", "promoted_at")})
            if pointer.key != key:
                raise ValueError(f"it names key {pointer.key!r}")
            if not isinstance(pointer.version, str) or not VERSION_NAME.match(pointer.version):
                raise ValueError(f"version {pointer.version!r} is not a version name of this store")
            return pointer
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise StoreError(f"plan store {self.uri}: latest pointer of key {key} is corrupt ({e})") from None

    def load(self, version: Version) -> Plan:
        path = self._path(version.key, version.relpath)
        try:
            return Plan.from_json(self.fs.cat_file(path).decode("utf-8"), source=self.url(version.key, version.relpath))
        except FileNotFoundError:
            raise StoreError(f"plan store {self.uri}: no plan {version.name} under key {version.key}") from None

    def latest(self, key: str) -> Plan | None:
        """The plan the pointer names, verified against the pointer's checksum; None if the key has no latest."""
        pointer = self.pointer(key)
        if pointer is None:
            return None
        plan = self.load(Version(key, pointer.version))
        if plan.checksum != pointer.checksum:
            raise StoreError(
                f"plan store {self.uri}: latest of key {key} names {pointer.version} with checksum "
                f"{pointer.checksum}, but that file has {plan.checksum}; refusing to use it"
            )
        return plan

    def latest_for(self, signature: PipelineSignature) -> Plan:
        """The latest plan for a pipeline, or a StoreError that names the key it looked for."""
        key = store_key(signature)
        plan = self.latest(key)
        if plan is None:
            known = ", ".join(self.keys()) or "none"
            raise StoreError(
                f"plan store {self.uri} has no latest plan for key {key} ({signature.architecture} "
                f"{signature.model_id!r}, {signature.num_inference_steps} steps, {signature.height}x{signature.width}, "
                f"guidance {signature.guidance_mode} {signature.guidance_scale:g}, {signature.dtype}); keys in the store: "
                f"{known}. Run `invardiff calibrate --workers N --store {self.uri}` with the same model and settings."
            )
        plan.check_compatible(signature)
        return plan

    # ---- writing

    def write(self, plan: Plan) -> Version:
        """Write a new version, read it back and validate it. On any failure the partial file is removed and
        the error re-raised; the pointer is untouched either way."""
        key = store_key(plan.signature)
        version = Version(key, version_name(plan))
        path = self._path(key, version.relpath)
        if self.fs.exists(path):
            raise StoreError(f"plan store {self.uri}: version {version.name} already exists under key {key}")
        signature_path = self._path(key, "signature.json")
        if not self.fs.exists(signature_path):
            self._put(signature_path, json.dumps(plan.signature.to_dict(), indent=2).encode())
        try:
            self._put(path, plan.to_json().encode("utf-8"))
            back = self.load(version)
            if back.checksum != plan.checksum:
                raise PlanError(f"{self.url(key, version.relpath)}: read back checksum {back.checksum} != {plan.checksum}")
            back.check_compatible(self.signature(key))
        except BaseException:
            self._remove_quietly(path)
            raise
        return version

    def promote(self, version: Version, *, replacing: Plan | None) -> Pointer:
        """Point ``latest`` at an already written version, after validating it once more, if ``latest`` still
        names ``replacing`` (None: if the key has no latest yet). Otherwise PromotionConflict, the pointer as the
        other writer left it, and the version stays in the store unpromoted."""
        plan = self.load(version)
        pointer = Pointer(
            key=version.key,
            version=version.name,
            plan_id=plan.plan_id,
            checksum=plan.checksum,
            promoted_at=datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        )
        doc = {"format": POINTER_FORMAT, **pointer.__dict__, "path": version.relpath}
        data = (json.dumps(doc, indent=2) + "\n").encode()
        for _ in range(PROMOTE_ATTEMPTS):
            current = self._pointer_bytes(version.key)
            self._check_names(version, self._decode_pointer(version.key, current), replacing)
            if self._swap_pointer(version.key, current, data):
                return pointer
        raise PromotionConflict(
            f"plan store {self.uri}: latest of key {version.key} keeps changing while promoting {version.name}; "
            "another refresh is promoting there"
        )

    def _check_names(self, version: Version, current: Pointer | None, replacing: Plan | None) -> None:
        if replacing is None and current is None:
            return
        if replacing is not None and current is not None and (current.plan_id, current.checksum) == (
            replacing.plan_id, replacing.checksum
        ):
            return
        was = f"plan {replacing.plan_id}" if replacing is not None else "no plan"
        now = f"{current.version} (promoted {current.promoted_at})" if current is not None else "nothing"
        raise PromotionConflict(
            f"plan store {self.uri}: latest of key {version.key} moved from {was} to {now} while this refresh ran; "
            f"{version.name} stays in the store, not promoted (refresh again to compare with the new latest)"
        )

    def _swap_pointer(self, key: str, expected: bytes | None, data: bytes) -> bool:
        """Replace the pointer with `data` if it still holds `expected` (None: absent); False if it changed."""
        if not self.local:
            from jobs.location import Location

            location = Location(self.url(key))
            if expected is None:
                return location.create_exclusive(LATEST, data)
            return location.swap(LATEST, expected, data)
        # Location.swap on a disk renames the old file aside first, so for an instant there is no pointer: a
        # reader resolving `--plan latest` then would fail. Here the check and an atomic rename run under a lock.
        folder = self._path(key)
        self.fs.makedirs(folder, exist_ok=True)
        with open(posixpath.join(folder, POINTER_LOCK), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released on close, or by the kernel if this process dies
            if self._pointer_bytes(key) != expected:
                return False
            self._put(self._path(key, LATEST), data)
            return True

    def write_report(self, version: Version, markdown: str, png: bytes | None) -> list[str]:
        base = f"reports/{version.name}-drift"
        written = []
        if png is not None:
            self._put(self._path(version.key, base + ".png"), png)
            written.append(self.url(version.key, base + ".png"))
        self._put(self._path(version.key, base + ".md"), markdown.encode("utf-8"))
        written.append(self.url(version.key, base + ".md"))
        return written

    def _put(self, path: str, data: bytes) -> None:
        """Whole-object write: temp file + rename locally, a single PUT elsewhere (S3 has no partial objects)."""
        if not self.local:
            self.fs.pipe_file(path, data)
            return
        folder = posixpath.dirname(path)
        self.fs.makedirs(folder, exist_ok=True)
        temporary = posixpath.join(folder, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with self.fs.open(temporary, "wb") as file:
                file.write(data)
            self.fs.mv(temporary, path)  # os.rename on one filesystem: atomic
        except BaseException:
            self._remove_quietly(temporary)
            raise

    def _remove_quietly(self, path: str) -> None:
        # Cleanup after a failure: the original error is the one worth raising, not a second one from here.
        with contextlib.suppress(Exception):
            if self.fs.exists(path):
                self.fs.rm(path)

    # ---- listing

    def describe(self) -> list[dict[str, Any]]:
        """One entry per key: its signature and versions, the latest marked."""
        rows = []
        for key in self.keys():
            pointer = self.pointer(key)
            rows.append(
                {
                    "key": key,
                    "signature": self.signature(key),
                    "latest": pointer.version if pointer else None,
                    "versions": [v.name for v in self.versions(key)],
                    "reports": self._reports(key),
                }
            )
        return rows

    def _reports(self, key: str) -> set[str]:
        folder = self._path(key, "reports")
        if not self.fs.exists(folder):
            return set()
        return {posixpath.basename(p).removesuffix("-drift.md") for p in self.fs.ls(folder, detail=False) if p.endswith("-drift.md")}


def format_listing(store: PlanStore) -> str:
    rows = store.describe()
    if not rows:
        return f"plan store {store.uri}: empty"
    lines = [f"plan store {store.uri}: {len(rows)} key(s)"]
    for row in rows:
        sig = row["signature"]
        lines.append(
            f"\n{row['key']}  {sig.architecture} {sig.model_id!r} {sig.scheduler}, {sig.num_inference_steps} steps, "
            f"{sig.height}x{sig.width}, guidance {sig.guidance_mode} {sig.guidance_scale:g}, {sig.dtype}"
        )
        for name in reversed(row["versions"]):
            marks = []
            if name == row["latest"]:
                marks.append("latest")
            if name in row["reports"]:
                marks.append("drift report")
            lines.append(f"  {name}{'  <- ' + ', '.join(marks) if marks else ''}")
        if row["latest"] is None:
            lines.append("  (no latest: nothing promoted yet)")
    return "\n".join(lines)


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def signature_for(config, address: str | None = None) -> PipelineSignature:
    """The signature of the pipeline `config` builds. Embedded models are built right here (milliseconds to a
    second); a real checkpoint is built where the workers run, in one Ray task, so the driver (often a small head
    node) never loads tens of GB of weights."""
    from dataclasses import replace

    from pipelines.build import EMBEDDED_MODELS, build_generator

    if config.model in EMBEDDED_MODELS:
        return build_generator(replace(config, device="cpu")).signature()
    import ray

    from jobs.ray_runtime import cluster_gpus, ensure_ray

    ensure_ray(address)
    gpus = cluster_gpus() if config.device in (None, "cuda") else 0
    task = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0.5)(lambda c: build_generator(c).signature())
    return ray.get(task.remote(config if gpus else replace(config, device=config.device or "cpu")))


def resolve_latest(store_uri: str, config, *, address: str | None = None) -> Plan:
    """`--plan latest`: the store's latest plan for the pipeline `config` describes, or a StoreError naming the key."""
    store = PlanStore(store_uri)
    store.check_reachable()
    return store.latest_for(signature_for(config, address))
