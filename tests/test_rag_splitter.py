"""Splitter invariants, checked property-style over many texts and sizes.

Token counts are re-measured by tokenizing each chunk on its own, not trusted from the splitter.
"""
import random

import pytest
from langchain_text_splitters import RecursiveCharacterTextSplitter

from servelm.rag.splitter import Splitter
from tests.rag_support import tokenizer, wiki_texts

WORDS = ("lighthouse keeper tide harbour cliff storm lamp oil kerosene bee hive orchard blossom "
         "anarchism philosophy society 1873 2011 forty-two e.g. U.S.A. naïve café 東京 ").split()


def random_text(rng: random.Random) -> str:
    """A text mixing paragraphs, lines, sentences, long words, unicode and runs of spaces."""
    parts = []
    for _ in range(rng.randint(1, 40)):
        sent = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))
        if rng.random() < 0.05:
            sent += " " + "x" * rng.randint(30, 400)  # a word longer than a chunk: token-level cuts
        parts.append(sent + rng.choice([". ", "! ", "? ", "\n", "\n\n", "  \n \n", " "]))
    return "".join(parts)


def check(sp: Splitter, text: str):
    chunks = sp.split(text)
    ntok = sp.count
    if not text.strip():
        assert chunks == []
        return chunks
    assert chunks, "non-empty text gave no chunks"
    for c in chunks:
        assert c.text == text[c.start:c.end]
        assert ntok(c.text) <= sp.chunk_size, f"chunk of {ntok(c.text)} tokens > {sp.chunk_size}"
    for a, b in zip(chunks, chunks[1:]):
        assert a.start < b.start and a.end < b.end, "chunks out of order"
        if sp.overlap:
            assert b.start < a.end, "no overlap between consecutive chunks"
            shared = ntok(text[b.start:a.end])
            assert sp.overlap <= shared <= sp.overlap + sp.slack, f"overlap {shared} tokens, want {sp.overlap}"
        else:
            assert b.start >= a.end
    # Coverage: every non-whitespace character lies in some chunk, in order.
    covered, pos = 0, 0
    for c in chunks:
        assert c.start <= max(pos, covered) or not text[covered:c.start].strip(), "gap in coverage"
        covered = max(covered, c.end)
        pos = c.end
    assert not text[:chunks[0].start].strip() and not text[chunks[-1].end:].strip()
    return chunks


@pytest.mark.parametrize("size,overlap", [(500, 50), (64, 16), (20, 5), (32, 0), (16, 8)])
def test_invariants_on_random_texts(size, overlap):
    rng = random.Random(size * 1000 + overlap)
    sp = Splitter(tokenizer(), size, overlap)
    for _ in range(60):
        check(sp, random_text(rng))


@pytest.mark.parametrize("size,overlap", [(500, 50), (128, 32)])
def test_invariants_on_wikipedia(size, overlap):
    sp = Splitter(tokenizer(), size, overlap)
    for text in wiki_texts()[:8]:
        chunks = check(sp, text)
        assert len(chunks) > 1


def test_short_trailing_split_keeps_overlap():
    # LangChain #8142: a short final split gets no overlap. Ours always overlaps.
    text = ("The harbour lamp was lit every evening by the keeper. " * 12) + "\n\nEnd of log."
    sp = Splitter(tokenizer(), 64, 16)
    chunks = check(sp, text)
    last, prev = chunks[-1], chunks[-2]
    assert last.text.endswith("End of log.")
    assert sp.count(text[last.start:prev.end]) >= 16
    lc = RecursiveCharacterTextSplitter(chunk_size=64 * 4, chunk_overlap=16 * 4, add_start_index=True)
    docs = lc.create_documents([text])
    lc_last, lc_prev = docs[-1].metadata["start_index"], docs[-2].metadata["start_index"] + len(docs[-2].page_content)
    assert lc_last >= lc_prev, "LangChain gave the short last split an overlap; #8142 comparison no longer holds"


def test_pages_and_offsets_shift():
    sp = Splitter(tokenizer(), 32, 8)
    chunks = sp.split("alpha beta gamma. " * 30, base=1000, page=3, source="a.pdf")
    assert all(c.page == 3 and c.source == "a.pdf" and c.start >= 1000 for c in chunks)


def test_bad_sizes_are_rejected_with_the_rule():
    with pytest.raises(ValueError, match="chunk_overlap"):
        Splitter(tokenizer(), 100, 80)
