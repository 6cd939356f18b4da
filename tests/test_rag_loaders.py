"""Loaders on real committed fixtures, and a clear error for every kind of bad file."""
import json
import os

import pytest

from servelm.rag.loaders import LoaderError, load_bytes
from tests.rag_support import FIXTURES


def read(name):
    with open(os.path.join(FIXTURES, name), "rb") as f:
        return f.read()


def test_pdf_pages_keep_their_numbers():
    pages = load_bytes("sample.pdf", read("sample.pdf"))
    assert [p.page for p in pages] == [1, 2]
    assert "Fenwick lighthouse was built in 1873" in pages[0].text
    assert "storm of 2011" in pages[1].text


def test_html_text_without_scripts_or_styles():
    (page,) = load_bytes("page.html", read("page.html"))
    assert "forty thousand worker bees" in page.text
    assert "Inspect frames every nine days" in page.text
    assert "console.log" not in page.text and "font-family" not in page.text


def test_markdown_keeps_text():
    (page,) = load_bytes("notes.md", read("notes.md"))
    assert "250 degrees Celsius" in page.text and page.page is None


def test_json_and_jsonl():
    (j,) = load_bytes("a.json", json.dumps({"title": "Tides", "text": "Spring tides follow the full moon."}).encode())
    assert "title: Tides" in j.text and "Spring tides follow the full moon." in j.text
    (jl,) = load_bytes("a.jsonl", b'{"text": "first record"}\n\n{"text": "second record"}\n')
    assert "first record" in jl.text and "second record" in jl.text


@pytest.mark.parametrize("name,data,match", [
    ("encrypted.pdf", None, "encrypted"),
    ("corrupt.pdf", None, "corrupt PDF"),
    ("empty.txt", b"", "empty"),
    ("blank.md", b"  \n\n ", "empty"),
    ("image.png", b"\x89PNG\r\n", "unsupported file type '.png'"),
    ("noext", b"hello", "unsupported file type"),
    ("bad.json", b"{not json", "invalid JSON at line 1"),
    ("bad.jsonl", b'{"a": 1}\n{oops\n', "invalid JSON on line 2"),
    ("binary.txt", bytes(range(256)) * 4, "not valid UTF-8 text .* no other text encoding fits"),
    ("old.docx", b"\xd0\xcf\x11\xe0 a Word 97 file", "not a readable .docx file"),
])
def test_bad_files_get_a_clear_error(name, data, match):
    with pytest.raises(LoaderError, match=match) as e:
        load_bytes(name, read(name) if data is None else data)
    assert name in str(e.value)


def test_windows_and_latin1_text_files_are_decoded():
    """Text exported on Windows (cp1252, with its curly quotes and euro sign) or in Latin-1 is read, as
    LangChain's TextLoader(autodetect_encoding=True) does, instead of being refused."""
    menu = "Café crème brûlée – “quoted” naïve façade, déjà vu.\nSecond line of the menu: prix fixe 25 €."
    assert load_bytes("menu.txt", menu.encode("cp1252"))[0].text == menu
    german = "Straße über Größe: Müller aß Äpfel und Öl. Die Brücke ist lang."
    assert load_bytes("de.txt", german.encode("latin-1"))[0].text == german


def test_docx_paragraphs_and_tables_in_document_order():
    import io

    import docx

    d = docx.Document()
    d.add_heading("Quarterly report", 1)
    d.add_paragraph("Revenue grew 12% in the third quarter.")
    table = d.add_table(rows=2, cols=2)
    for (r, c), text in {(0, 0): "Region", (0, 1): "Sales", (1, 0): "EMEA", (1, 1): "4.2M"}.items():
        table.cell(r, c).text = text
    d.add_paragraph("The outlook is stable.")
    buf = io.BytesIO()
    d.save(buf)
    (page,) = load_bytes("report.docx", buf.getvalue())
    assert page.text == ("Quarterly report\n\nRevenue grew 12% in the third quarter.\n\nRegion | Sales\nEMEA | 4.2M"
                         "\n\nThe outlook is stable.")


def test_csv_rows_keep_their_column_names():
    """Each row becomes a paragraph of ``column: value`` lines (empty cells left out), so a chunk that
    holds a row says what its values are; the delimiter is sniffed (; here), or a tab for .tsv."""
    (page,) = load_bytes("people.csv", "name;city;age\nAlice;Paris;30\nBob;;41\n".encode())
    assert page.text == "name: Alice\ncity: Paris\nage: 30\n\nname: Bob\nage: 41"
    (tsv,) = load_bytes("t.tsv", b"product\tprice\nlamp, brass\t12\n")
    assert tsv.text == "product: lamp, brass\nprice: 12"


def test_size_limit():
    with pytest.raises(LoaderError, match="over the size limit of 10 bytes"):
        load_bytes("big.txt", b"x" * 11, max_bytes=10)
