"""Resume on S3: a load-test run of N rows written to a moto S3 server on 127.0.0.1, then the same command again
with every row done (issue 14's "resume with everything done ≤ 60 s for 1M rows, local disk and moto S3").

    python -m benchmarks.s3_resume --rows 1000000 --out benchmarks/results/s3_resume

moto's standalone server (a real S3 endpoint, as the tests use) runs as a child process; the job reaches it
through the standard AWS environment variables. Each command is measured as benchmarks/pipeline_capacity.py
measures its phases (wall, CPU of the whole process tree, peak RSS by role). Results: --out/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.pipeline_capacity import Watched, class_args

BUCKET = "invardiff-bench"


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            if time.time() > deadline:
                server.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    server, endpoint = start_moto()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        import s3fs

        s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir(BUCKET)
        command = [sys.executable, "-m", "jobs.cli", "generate", "--model", "loadtest", *class_args(args.rows),
                   "--batch-size", str(args.batch_size), "--out", f"s3://{BUCKET}/run"]
        results = {"rows": args.rows, "endpoint": "moto_server on 127.0.0.1", "load_average": os.getloadavg()}
        for phase in ("full", "rerun"):
            print(f"[s3_resume] {phase} ...", flush=True)
            results[phase] = Watched(command, args.out / "logs" / f"{phase}.log").run()
            print(f"[s3_resume] {phase}: exit {results[phase]['exit_code']}, wall {results[phase]['wall_s']} s, "
                  f"CPU {results[phase]['cpu_s_total']} s; {results[phase]['log_tail'][-1]}", flush=True)
    finally:
        server.kill()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
