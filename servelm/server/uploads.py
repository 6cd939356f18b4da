"""Per-file checks for document uploads: which HTTP status and error code a bad file gets."""
from __future__ import annotations


def check_upload(filename: str, data: bytes, max_bytes: int) -> dict | None:
    """Returns ``{"message", "code", "status"}`` for a file that cannot be ingested before parsing it
    (no name, unsupported type -> 415, over ``max_bytes`` -> 413, empty -> 400), or None when it may go on."""
    from servelm.rag.loaders import LoaderError, check_supported

    if not filename:
        return {"message": "The uploaded file has no filename; the type is read from its extension.",
                "code": "missing_filename", "status": 400}
    try:
        check_supported(filename)
    except LoaderError as e:
        return {"message": str(e), "code": "unsupported_file_type", "status": 415}
    if len(data) > max_bytes:
        return {"message": f"{filename}: {len(data)} bytes is over the upload limit of {max_bytes} bytes; "
                           "split the file or raise --rag-max-file-bytes.", "code": "file_too_large", "status": 413}
    if not data.strip():
        return {"message": f"{filename}: the file is empty.", "code": "empty_file", "status": 400}
    return None


def classify(message: str) -> tuple[int, str]:
    """Returns ``(status, code)`` for an ingest error message from the RAG loaders."""
    text = message.lower()
    for needle, status, code in (("encrypted", 400, "encrypted_file"), ("corrupt", 400, "corrupt_file"),
                                 ("over the size limit", 413, "file_too_large"), ("unsupported", 415,
                                 "unsupported_file_type"), ("empty", 400, "empty_file"),
                                 ("no text could be extracted", 400, "no_text")):
        if needle in text:
            return status, code
    return 400, "unreadable_file"
