"""Turn a file's bytes into text pages with well-kept parsers (pypdf, python-docx, BeautifulSoup, csv, json).

Every failure is a :class:`LoaderError` whose message names the file and what to fix;
the ingester records it for that file and carries on with the rest of the batch.
"""
from __future__ import annotations

import csv
import io
import json
import os
import zipfile
from dataclasses import dataclass

SUPPORTED = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".docx", ".csv", ".tsv", ".json", ".jsonl")


class LoaderError(ValueError):
    """A file could not be turned into text; ``str(e)`` says why and what to do."""


@dataclass(slots=True)
class Page:
    """Text of one page (``page`` is 1-based for PDFs, None for page-less formats)."""

    text: str
    page: int | None = None


def check_supported(filename: str) -> str:
    """Return the lower-case extension of ``filename``; raises LoaderError if unsupported."""
    ext = os.path.splitext(filename)[1].lower()
    if ext not in SUPPORTED:
        raise LoaderError(f"{filename}: unsupported file type {ext or '(none)'!r}; supported: {', '.join(SUPPORTED)}")
    return ext


def load_bytes(filename: str, data: bytes, max_bytes: int | None = None) -> list[Page]:
    """Return the non-empty pages of ``data`` parsed according to ``filename``'s extension.

    Raises LoaderError for an unsupported type, a file over ``max_bytes``, an empty file,
    undecodable text, invalid JSON, a corrupt or an encrypted PDF.
    """
    ext = check_supported(filename)
    if max_bytes is not None and len(data) > max_bytes:
        raise LoaderError(f"{filename}: {len(data)} bytes is over the size limit of {max_bytes} bytes; split the file or raise max_file_bytes")
    if not data.strip():
        raise LoaderError(f"{filename}: the file is empty")
    if ext == ".pdf":
        pages = _pdf(filename, data)
    elif ext == ".docx":
        pages = [Page(_docx(filename, data))]
    else:
        text = _decode(filename, data)
        if ext in (".html", ".htm"):
            text = _html(text)
        elif ext == ".json":
            text = _json_text(filename, text)
        elif ext == ".jsonl":
            text = _jsonl_text(filename, text)
        elif ext in (".csv", ".tsv"):
            text = _csv_text(filename, text, "\t" if ext == ".tsv" else None)
        pages = [Page(text)]
    pages = [p for p in pages if p.text.strip()]
    if not pages:
        raise LoaderError(f"{filename}: no text could be extracted (empty, or a scanned PDF without a text layer)")
    return pages


def _decode(filename: str, data: bytes) -> str:
    for enc in ("utf-8-sig", "utf-16") if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ("utf-8-sig",):
        try:
            return data.decode(enc)
        except UnicodeDecodeError:
            continue
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        # Windows-exported text is often cp1252 or latin-1: detect the encoding (as LangChain's TextLoader
        # with autodetect_encoding does), and refuse only what decodes to no plausible text.
        from charset_normalizer import from_bytes

        matches = list(from_bytes(data))
        # Short Western text fits several code pages about equally; Windows' own (cp1252) is the likely one.
        best = next((m for m in matches if m.encoding in ("cp1252", "latin_1") and m.chaos <= matches[0].chaos + 0.1),
                    matches[0] if matches else None)
        text = str(best) if best is not None else ""
        if text and sum(not (c.isprintable() or c in "\n\r\t") for c in text) <= len(text) // 100:
            return text
        raise LoaderError(f"{filename}: not valid UTF-8 text ({e.reason} at byte {e.start}) and no other text "
                          "encoding fits; re-save it as UTF-8") from e


def _html(text: str) -> str:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(text, "html.parser")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    lines = (ln.strip() for ln in soup.get_text("\n").splitlines())
    # Block elements become paragraphs so the splitter can cut between them.
    return "\n\n".join(ln for ln in lines if ln)


def _flatten(obj, prefix: str = "") -> list[str]:
    if isinstance(obj, dict):
        # A "text"/"content" field is the document; other keys are context for it.
        out = []
        for k, v in obj.items():
            out += _flatten(v, f"{prefix}{k}: " if k not in ("text", "content") else prefix)
        return out
    if isinstance(obj, list):
        return [s for v in obj for s in _flatten(v, prefix)]
    if isinstance(obj, str):
        return [prefix + obj] if obj.strip() else []
    return [] if obj is None else [f"{prefix}{obj}"]


def _json_text(filename: str, text: str) -> str:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise LoaderError(f"{filename}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    return "\n\n".join(_flatten(obj))


def _jsonl_text(filename: str, text: str) -> str:
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append("\n".join(_flatten(json.loads(line))))
        except json.JSONDecodeError as e:
            raise LoaderError(f"{filename}: invalid JSON on line {n}: {e.msg}") from e
    return "\n\n".join(records)


def _csv_text(filename: str, text: str, delimiter: str | None) -> str:
    """One paragraph per row, each cell as ``column: value`` (LangChain's CSVLoader writes rows so), so a
    retrieved chunk carries its column names. The delimiter is sniffed unless the extension says it."""
    if delimiter is None:
        try:
            delimiter = csv.Sniffer().sniff(text[:8192], delimiters=",;\t|").delimiter
        except csv.Error:
            delimiter = ","
    try:
        rows = [r for r in csv.reader(io.StringIO(text), delimiter=delimiter) if any(c.strip() for c in r)]
    except csv.Error as e:
        raise LoaderError(f"{filename}: invalid CSV ({e}); check its quoting") from e
    if len(rows) < 2:
        return "\n".join(" ".join(r) for r in rows)  # a header alone, or one line: the text as it is
    header = [h.strip() or f"column {i + 1}" for i, h in enumerate(rows[0])]
    records = []
    for row in rows[1:]:
        cells = [(header[i] if i < len(header) else f"column {i + 1}", v.strip()) for i, v in enumerate(row)]
        records.append("\n".join(f"{k}: {v}" for k, v in cells if v))
    return "\n\n".join(records)


def _docx(filename: str, data: bytes) -> str:
    """Paragraphs and tables in document order; a table row becomes one line of ``|``-separated cells."""
    from docx import Document
    from docx.opc.exceptions import PackageNotFoundError
    from docx.table import Table

    try:
        doc = Document(io.BytesIO(data))
    except (PackageNotFoundError, zipfile.BadZipFile, KeyError, ValueError) as e:
        raise LoaderError(f"{filename}: not a readable .docx file ({type(e).__name__}); re-save it from Word "
                          "(a .doc from before 2007 must be converted first)") from e
    blocks = []
    for item in doc.iter_inner_content():
        if isinstance(item, Table):
            rows = [" | ".join(c.text.strip() for c in row.cells) for row in item.rows]
            blocks.append("\n".join(r for r in rows if r.strip(" |")))
        elif item.text.strip():
            blocks.append(item.text.strip())
    return "\n\n".join(b for b in blocks if b)


def _pdf(filename: str, data: bytes) -> list[Page]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            # An empty user password still opens some "encrypted" PDFs (owner-password only).
            try:
                ok = reader.decrypt("")
            except Exception:
                ok = 0
            if not ok:
                raise LoaderError(f"{filename}: the PDF is encrypted; remove the password (e.g. qpdf --decrypt) and ingest again")
        return [Page(p.extract_text() or "", i + 1) for i, p in enumerate(reader.pages)]
    except LoaderError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError) as e:
        raise LoaderError(f"{filename}: corrupt PDF ({type(e).__name__}: {e}); re-export it or repair it") from e
