"""The receiving side of `spinefrac serve`: a pynetdicom C-STORE SCP (every storage SOP class) and C-ECHO.

Each C-STORE is decoded in full (a dataset that does not decode is refused), its StudyInstanceUID and
SOPInstanceUID are checked (present, valid UIDs: they become folder and file names), and the bytes as sent,
with their file meta, are written durably into the spool. The answer is 0x0000 when the file is on disk,
else a failure status (STATUS_* below, docs/contracts.md); the node goes on either way. pynetdicom drops an
association that sends bytes which are not DICOM PDUs and goes on serving the others.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from typing import Any

from spinefrac.dicom_out.identity import MANUFACTURER as RESULTS_MANUFACTURER
from spinefrac.serve.spool import INVALID_UID, OUT_OF_RESOURCES, Spool, SpoolError

log = logging.getLogger("spinefrac")

UNDEFINED_LENGTH = 0xFFFFFFFF
STATUS_SUCCESS = 0x0000
STATUS_CANNOT_DECODE = 0xC210
"""Failure (cannot understand): the dataset does not decode."""
STATUS_MISSING_UID = 0xC211
"""Failure (cannot understand): no StudyInstanceUID or no SOPInstanceUID."""
STATUS_INVALID_UID = INVALID_UID
"""Failure (cannot understand): a UID that is not a valid DICOM UID (e.g. a path: never used as a file name)."""
STATUS_OUT_OF_RESOURCES = OUT_OF_RESOURCES
"""Failure: the spool could not write the instance (disk full, below worker.min_free_mb, max_spool_studies)."""
STATUS_PROCESSING_FAILURE = 0x0110
"""Failure: anything else went wrong while storing (logged with its reason)."""


def store_instance(spool: Spool, data: bytes, *, peer: str = "") -> int:
    """Check and spool one instance given as DICOM file bytes (preamble and file meta); return the DIMSE status."""
    from pydicom import dcmread

    try:
        ds = dcmread(io.BytesIO(data))
        check_complete(ds)
        study_uid = ds.get("StudyInstanceUID")
        sop_uid = ds.get("SOPInstanceUID")
    except Exception as exc:   # noqa: BLE001 - any decoding error of a peer's dataset is a refusal, not a crash
        log.warning("C-STORE from %s refused (0x%04X): the dataset does not decode: %s: %s", peer,
                    STATUS_CANNOT_DECODE, type(exc).__name__, exc)
        return STATUS_CANNOT_DECODE
    if str(ds.get("Manufacturer", "")) == RESULTS_MANUFACTURER:
        log.info("C-STORE from %s: %s is a spinefrac result (Manufacturer %r): acknowledged, not spooled, so a "
                 "PACS that routes a study's new objects back here does not start a loop", peer, sop_uid,
                 RESULTS_MANUFACTURER)
        return STATUS_SUCCESS
    missing = [name for name, value in (("StudyInstanceUID", study_uid), ("SOPInstanceUID", sop_uid)) if not value]
    if missing:
        log.warning("C-STORE from %s refused (0x%04X): the dataset has no %s", peer, STATUS_MISSING_UID,
                    " and no ".join(missing))
        return STATUS_MISSING_UID
    try:
        spool.store(str(study_uid), str(sop_uid), data)
    except SpoolError as exc:
        log.warning("C-STORE from %s refused (0x%04X): %s", peer, exc.status, exc.reason)
        return exc.status
    return STATUS_SUCCESS


def check_complete(ds: Any) -> None:
    """Raise ValueError unless every element of a just-read dataset decodes in full, its pixel data included.

    pydicom reads a cut-off file quietly (a short last value, or no Pixel Data at all), so: no top-level value
    may be shorter than its declared length, every element must convert, and an image (it has Rows) must
    have pixel data that decodes.
    """
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        length, value = getattr(raw, "length", None), getattr(raw, "value", None)
        if getattr(raw, "is_raw", False) and length != UNDEFINED_LENGTH and isinstance(value, bytes) \
                and len(value) < length:
            raise ValueError(f"element {tag} is cut short ({len(value)} of {length} bytes): the object is truncated")
    for _ in ds.iterall():
        pass
    if "Rows" in ds:
        ds.pixel_array   # noqa: B018 - decoding is the check (a missing or cut-off Pixel Data raises)


def make_store_handler(spool: Spool, on_stored: Callable[[], None] | None = None) -> Callable[[Any], int]:
    """The EVT_C_STORE handler: spool the request's dataset; never raises (a failure is a status)."""
    def handle(event: Any) -> int:
        peer = _peer(event)
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as exc:   # noqa: BLE001 - whatever pynetdicom could not give us: refused, logged
            log.warning("C-STORE from %s refused (0x%04X): %s: %s", peer, STATUS_CANNOT_DECODE, type(exc).__name__, exc)
            return STATUS_CANNOT_DECODE
        try:
            status = store_instance(spool, data, peer=peer)
        except Exception as exc:   # noqa: BLE001 - the node must keep serving
            log.exception("C-STORE from %s failed: %s", peer, exc)
            return STATUS_PROCESSING_FAILURE
        if status == STATUS_SUCCESS and on_stored is not None:
            on_stored()
        return status
    return handle


def handle_echo(event: Any) -> int:
    """The EVT_C_ECHO handler: success."""
    return STATUS_SUCCESS


def build_ae(ae_title: str, *, max_associations: int, network_timeout: float, dimse_timeout: float,
             require_called_ae_title: bool, allowed_calling_ae_titles: Sequence[str] = ()) -> Any:
    """A pynetdicom AE accepting every storage SOP class in every transfer syntax, and Verification.

    allowed_calling_ae_titles: associations from any other calling AE title are rejected (empty: any).
    """
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=ae_title)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    ae.maximum_associations = int(max_associations)
    ae.network_timeout = float(network_timeout)
    ae.dimse_timeout = float(dimse_timeout)
    ae.acse_timeout = float(dimse_timeout)
    ae.require_called_aet = bool(require_called_ae_title)
    ae.require_calling_aet = [str(t) for t in allowed_calling_ae_titles]
    return ae


def _peer(event: Any) -> str:
    """'AE@host:port' of the association's requestor, for the log."""
    try:
        req = event.assoc.requestor
        return f"{req.ae_title}@{req.address}:{req.port}"
    except AttributeError:
        return "?"
