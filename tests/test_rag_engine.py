"""End to end with the real engine (the embedded SmolLM2 GGUF): retrieve, prompt, generate, cite."""
import os

from servelm.engine import AsyncEngine, EngineConfig, SamplingParams
from servelm.rag.config import RagConfig
from servelm.rag.schemas import CollectionCreate, RagQueryRequest
from servelm.rag.service import RagService
from tests.rag_support import FIXTURES, embedder


async def test_rag_query_with_the_engine(tmp_path):
    eng = AsyncEngine(EngineConfig(model=None))
    await eng.start()
    try:
        tok = eng.tokenizer
        svc = RagService(RagConfig(data_dir=str(tmp_path), chunk_size=64, chunk_overlap=8), embedder=embedder(),
                         count_tokens=lambda m: len(tok.encode(tok.apply_chat_template(m), add_special_tokens=False)),
                         context_window=eng.max_model_len)
        await svc.create_collection(CollectionCreate(name="kb"))
        for f in ("sample.pdf", "page.html", "notes.md"):
            with open(os.path.join(FIXTURES, f), "rb") as fh:
                await svc.add_document("kb", f, fh.read())
        prompts = []

        async def generate(messages):
            prompt = tok.apply_chat_template(messages)
            prompts.append(prompt)
            async for out in eng.generate(prompt, SamplingParams(max_tokens=40, temperature=0.0), request_id="rag-e2e"):
                yield out.outputs[0].delta_text

        r = await svc.query(RagQueryRequest(collection="kb", query="When was the Fenwick lighthouse built?", k=3), generate)
        assert r.found and "1873" in r.answer  # the fact is only in the retrieved PDF chunk
        assert "Fenwick lighthouse was built in 1873" in prompts[0]
        assert r.sources and r.sources[0].source == "sample.pdf" and r.sources[0].page == 1
        for s in r.sources:
            (chunk,) = svc.store.get_chunks("kb", [s.chunk_id])
            assert s.snippet in chunk.text
        svc.close()
    finally:
        await eng.shutdown()
