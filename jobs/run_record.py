"""The run record, `_run.json`: the job's claim on its output location, what the rows there were generated with,
and one entry per run (asked, written, failed, missing; when; how it ended).

    {"format": "invardiff-run/1", "created_at": ...,
     "request": {model fingerprint, architecture, scheduler, steps, resolution, guidance, dtype, layers,
                 policy, plan_id},
     "runs": [{"run_id", "command", "started_at", "finished_at", "status", "asked", "already_there",
               "written", "failed", "missing", "max_attempts", "message",
               "shadow" (with generate --shadow): {"fraction", "min_psnr", "rows", "mean_psnr",
                                                   "drift" (the alarm's line, or null), "stopped"}}, ...]}

A run's entry is written (status "running") before its first data file, so every data file the job writes,
`<run_id>_<write>_<task>.parquet`, is attributable to a run the record lists; anything else in the location is
not the job's and is never deleted or read as output. The entry is rewritten last, when the run has been
reconciled: status "complete" means every row it was asked for is written without error.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from jobs.location import Location, LocationError

RECORD_NAME = "_run.json"
RECORD_FORMAT = "invardiff-run/1"
RUN_ID = re.compile(r"^r[0-9]{8}T[0-9]{6}Z[0-9a-f]{8}$")
# Fields of the request that decide what an image looks like; model_id is only a name for the same weights.
INFORMATIVE_FIELDS = ("model_id",)


def new_run_id() -> str:
    # Sortable by start time, and a fixed shape, so data file names can be matched to runs exactly.
    return "r" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + uuid.uuid4().hex[:8]


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class RunRecord:
    request: dict
    created_at: str = field(default_factory=utc_now)
    runs: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls, location: Location) -> RunRecord | None:
        data = location.read(RECORD_NAME)
        if data is None:
            return None
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != RECORD_FORMAT:
                raise ValueError(f"format {doc.get('format') if isinstance(doc, dict) else None!r}")
            runs = doc["runs"]
            if not isinstance(doc["request"], dict) or not all(RUN_ID.match(r.get("run_id", "")) for r in runs):
                raise ValueError("malformed request or run ids")
            return cls(request=doc["request"], created_at=doc["created_at"], runs=runs)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise LocationError(
                f"--out {location.uri} holds a {RECORD_NAME} that is not an invardiff run record ({e}); "
                "invardiff never reinterprets files it did not write: give another --out"
            ) from None

    def save(self, location: Location) -> None:
        doc = {"format": RECORD_FORMAT, "created_at": self.created_at, "request": self.request, "runs": self.runs}
        location.replace(RECORD_NAME, (json.dumps(doc, indent=2) + "\n").encode())

    @property
    def run_ids(self) -> set[str]:
        return {r["run_id"] for r in self.runs}

    def differences(self, request: dict) -> list[str]:
        """'field: here X, asked Y' for each field that decides the images and differs; empty if none."""
        keys = sorted((set(self.request) | set(request)) - set(INFORMATIVE_FIELDS))
        return [
            f"{k}: {_show(self.request.get(k))} there, {_show(request.get(k))} asked"
            for k in keys
            if self.request.get(k) != request.get(k)
        ]

    def start_run(self, run_id: str, command: str, *, asked: int, already_there: int, max_attempts: int) -> dict:
        entry = {
            "run_id": run_id,
            "command": command,
            "started_at": utc_now(),
            "finished_at": None,
            "status": "running",
            "asked": asked,
            "already_there": already_there,
            "written": None,
            "failed": None,
            "missing": None,
            "max_attempts": max_attempts,
            "message": None,
        }
        self.runs.append(entry)
        return entry


def request_of(signature, *, policy: str, plan_id: str | None) -> dict:
    """What every row in one location is generated with: the pipeline signature, the policy and the plan."""
    return {**signature.to_dict(), "policy": policy, "plan_id": plan_id}


def _show(value) -> str:
    if isinstance(value, str) and value.startswith("sha256:"):
        return value[:19]
    return json.dumps(value) if not isinstance(value, str) else value
