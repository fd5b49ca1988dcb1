"""The sending side of `spinefrac serve`: a C-STORE SCU that sends a study's result files to the destination."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from data_prep.errors import SpinefracError

log = logging.getLogger("spinefrac")

SEND_OK = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
"""C-STORE statuses that mean stored: success, and the warnings (coercion, elements discarded, mismatch)."""


class SendError(SpinefracError):
    """The destination could not be reached, refused the association, or did not store a file."""


def destination_of(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The configured destination (ae_title, host, port, timeout_s) or None when none is configured."""
    if config.get("ae_title") is None:
        return None
    return {"ae_title": str(config["ae_title"]), "host": str(config["host"]), "port": int(config["port"]),
            "timeout_s": float(config["timeout_s"])}


def send_files(files: Sequence[str | os.PathLike], *, calling_ae: str, destination: Mapping[str, Any]) -> int:
    """Send DICOM files in one association to the destination; return how many were stored, or raise SendError."""
    from pydicom import dcmread
    from pynetdicom import AE

    where = f"{destination['ae_title']}@{destination['host']}:{destination['port']}"
    if not files:
        return 0
    datasets = []
    for path in files:
        try:
            datasets.append(dcmread(Path(path)))
        except Exception as exc:   # noqa: BLE001 - a result file we cannot read is a send failure, named
            raise SendError(f"{path}: cannot read the result file to send it: {exc}") from None
    ae = AE(ae_title=calling_ae)
    timeout = float(destination["timeout_s"])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for sop_class, syntax in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}):
        ae.add_requested_context(sop_class, syntax)   # one context per transfer syntax: each file goes as written
    assoc = ae.associate(destination["host"], int(destination["port"]), ae_title=destination["ae_title"])
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        raise SendError(f"association with {where} {why}")
    sent = 0
    try:
        for path, ds in zip(files, datasets, strict=True):
            status = assoc.send_c_store(ds)
            code = int(status.Status) if status and "Status" in status else None
            if code not in SEND_OK:
                raise SendError(f"{where} did not store {path}: status "
                                f"{'none (connection lost or timed out)' if code is None else f'0x{code:04X}'}")
            sent += 1
    finally:
        if assoc.is_established:
            assoc.release()
    return sent
