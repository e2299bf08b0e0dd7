"""An S3 endpoint on loopback (moto's server) for the rehearsal: the job reads its corpus and writes every
artifact there, as production does on S3, through the same fsspec options a MinIO user would set."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from geoloc_ray.rehearse.cluster import free_ports


@dataclass
class LoopbackS3:
    server: Any
    options: dict[str, Any]  # what `data.storage_options.s3` takes: keys and the endpoint

    @property
    def endpoint(self) -> str:
        return self.options["client_kwargs"]["endpoint_url"]

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(**self.options)

    def stop(self) -> None:
        self.server.stop()


def start_s3(bucket: str) -> LoopbackS3:
    """moto's threaded server on 127.0.0.1 and one empty bucket (no region: moto refuses its constraint)."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        raise RuntimeError("the rehearsal's S3 endpoint needs moto[server]: pip install -e '.[dev]'") from exc
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_ports(1)[0], verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = LoopbackS3(server, {"key": "rehearsal", "secret": "rehearsal",
                             "client_kwargs": {"endpoint_url": f"http://{host}:{port}"}})
    s3.filesystem().mkdir(bucket)
    return s3


def upload_folder(s3: LoopbackS3, local: str, uri: str, renames: dict[str, str] | None = None) -> int:
    """Copy a local folder (a GeoText-layout world) to `uri`, top-level files named in `renames` under their new
    names; returns the number of files."""
    fs = s3.filesystem()
    count = 0
    for folder, _, files in os.walk(local):
        for name in files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, local)
            fs.put_file(path, f"{uri.rstrip('/')}/{(renames or {}).get(rel, rel)}")
            count += 1
    if count == 0:
        raise ValueError(f"--world {local}: no files to upload")
    return count
