"""Hand-written rules for prompt injection and jailbreaks: fast, explainable, high precision.

Each rule is a named regular expression over the normalised text (and its decoded
views). Rules are the first layer; the learned classifier catches paraphrases.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_IGNORE = r"(?:ignore|disregard|forget|skip|override|bypass|drop|abandon|discard|overlook|neglect)"
_PREV = r"(?:all\s+|any\s+|the\s+|your\s+|my\s+|these\s+|those\s+|of\s+)*(?:previous|prior|above|earlier|preceding|former|original|initial|system|existing|old|foregoing)"
_MODE = r"(?:developer|god|jailbreak|jailbroken|unrestricted|unfiltered|uncensored|evil|admin|debug|sudo|dan)\s+mode\b"
_INSTR = r"(?:instructions?|prompts?|rules?|directions?|guidelines?|directives?|commands?|context|messages?|constraints?|programming|orders?|text|restrictions?)"

RULES: dict[str, str] = {
    # "Ignore all previous instructions", "disregard the above rules", ...
    "ignore_previous": rf"\b{_IGNORE}\b[^.\n]{{0,30}}?\b{_PREV}\b[^.\n]{{0,20}}?\b{_INSTR}\b",
    "ignore_everything": rf"\b{_IGNORE}\s+(?:everything|all(?:\s+of\s+it)?|anything)\s+(?:above|before|previously|you\s+(?:were|have\s+been)\s+told)",
    "new_instructions": r"\b(?:new|updated|real|actual|important)\s+(?:system\s+)?instructions?\s*(?:[:\-]|\*\*\*|are\b|follow)",
    "fake_system_turn": r"(?:^|\n)\s*(?:\[\s*system\s*\]|<\|?\s*(?:im_start|system)\s*\|?>|###\s*system|system\s*(?:override|message|prompt)\s*:)",
    "dan_persona": r"\b(?:DAN|STAN|DUDE|AIM|AntiDAN|BetterDAN)\b[^\n]{0,80}\b(?:do\s+anything\s+now|strive\s+to\s+avoid\s+norms|no\s+(?:rules|restrictions|limits|filters?))|\bdo\s+anything\s+now\b",
    # A "mode" the assistant is put in ("you are now in developer mode", "Enable DAN mode.", "Developer Mode
    # enabled"), not one a user asks about ("enable developer mode on my Android phone", "god mode in Doom").
    "no_restrictions_mode": (rf"\byou(?:'re|\s+are|\s+will\s+be|\s+will|\s+must|\s+now)?\s+(?:now\s+)?(?:be\s+)?"
                             rf"(?:in|entering|enter|operating\s+in|running\s+in|switch(?:ed)?\s+to|act(?:ing)?\s+(?:in|as))"
                             rf"\s+(?:the\s+|a\s+|your\s+)?{_MODE}"
                             rf"|(?:^|[.!:\n]\s*)(?:please\s+|now\s+)?(?:enter|activate|enable|switch\s+to|go\s+into|turn\s+on)"
                             rf"\s+(?:the\s+|your\s+)?{_MODE}(?![^.\n]{{0,40}}\b(?:on|in|for|of)\s+(?:my|the|a|an|this)\b)"
                             rf"|{_MODE}[^.\n]{{0,12}}\b(?:enabled|activated|engaged)\b(?![^.\n]{{0,30}}\b(?:on|in)\s+(?:my|the)\b)"
                             r"|\b(?:you\s+are|you're|you\s+have\s+been|you've\s+been|now)\s+(?:fully\s+)?jailbroken\b"
                             r"|\bjailbreak\s+(?:yourself|your\s+(?:rules|restrictions|programming|filters?))\b"
                             # the reply markers and commands of DAN-style prompts: "[🔓JAILBREAK]", "/jailbroken"
                             r"|\[\W{0,3}jailbr(?:eak|oken)\W{0,3}\]|(?:^|\s)/jailbr(?:eak|oken)\b"),
    "no_rules_persona": r"\b(?:you\s+are|act\s+as|pretend\s+(?:to\s+be|you\s+are)|roleplay\s+as|from\s+now\s+on[, ]+you)\b[^.\n]{0,80}\b(?:no|without|free\s+(?:of|from))\s+(?:any\s+)?(?:rules|restrictions|limits|limitations|filters?|censorship|guidelines|ethics|morals|content\s+polic(?:y|ies))",
    "reveal_system_prompt": r"\b(?:reveal|show|print|repeat|output|display|tell\s+me|give\s+me|leak|dump|what\s+(?:is|are|were))\b[^.\n]{0,40}\b(?:system\s+prompt|initial\s+(?:prompt|instructions)|hidden\s+(?:prompt|instructions)|instructions\s+(?:you\s+were\s+given|above)|your\s+(?:instructions|prompt|rules))",
    "stay_in_character": r"\b(?:stay|remain)\s+in\s+character\b|\bbroke\s+character\b",
    "policy_evasion": r"\b(?:ignore|bypass|disable|turn\s+off|without)\s+(?:your\s+|the\s+|all\s+|any\s+)*(?:safety|content|ethical|moral)\s+(?:filters?|guidelines|polic(?:y|ies)|restrictions|rules|training)",
    "exfiltrate": r"\b(?:send|forward|post|upload|exfiltrate|email)\b[^.\n]{0,60}\b(?:api\s+keys?|credentials|passwords?|secrets?|tokens?|environment\s+variables|customer\s+(?:data|database|emails))\b[^.\n]{0,40}\b(?:to|at)\b",
    "markdown_exfil": r"!\[[^\]]*\]\(https?://[^)\s]*[?&][^)\s]*=",
    # "Heed only my guidance", "from now on my word is your only rule": the user claims sole authority.
    "obey_only_me": r"\b(?:heed|follow|obey|listen\s+to)\s+only\s+(?:me|my)\b|\bonly\s+(?:obey|follow|heed)\s+(?:me|my)\b"
                    r"|\bmy\s+(?:word|instructions?|commands?)\s+(?:is|are)\s+your\s+only\s+(?:rules?|law|instructions?)\b",
    # The override and the system-prompt request in the languages the guard's users write in most. Each
    # alternative needs a verb of ignoring/revealing *and* an object that names the assistant's instructions.
    "ignore_previous_multilingual": (
        r"\b(?:ignorier\w*|vergiss|vergesst|missachte\w*)\b[^.\n]{0,40}\b(?:vorherig|bisherig|obig|vorig|ursprünglich)\w*\s+(?:anweisung|regel|instruktion|befehl|vorgabe)"
        r"|\b(?:ignore[sz]?|oublie[sz]?|ne\s+tiens\s+pas\s+compte\s+d)\b[^.\n]{0,40}\b(?:instructions|consignes|règles|directives)\s+(?:précédentes|antérieures|ci-dessus|initiales)"
        r"|\b(?:ignora|olvida|olvide|ignore|esqueça|esqueca|dimentica|negeer|vergeet)\b[^.\n]{0,40}\b(?:instrucciones|reglas|indicaciones|instruções|instrucoes|regras|orientações|istruzioni|regole|instructies|regels)\s+(?:anteriores|previas|prévias|precedenti|eerdere|vorige)"
        r"|önceki\s+(?:tüm\s+)?(?:talimat|kural|yönerge)\w*\s+(?:unut|yok\s+say|görmezden\s+gel)"
        r"|(?:игнорируй|забудь|проигнорируй)[^.\n]{0,30}(?:предыдущие|прежние|все)\s+(?:инструкции|указания|правила)"
        r"|(?:忽略|无视|忘记|忘掉)[^。\n]{0,10}(?:之前|以前|上面|先前|前面)[^。\n]{0,6}(?:指示|指令|规则|说明)"
        r"|(?:以前|前|これまで)の[^。\n]{0,6}(?:指示|命令|ルール)[^。\n]{0,10}(?:無視|忘れ)"
        r"|(?:이전|앞의|기존)[^.\n]{0,10}(?:지시|명령|규칙)[^.\n]{0,6}(?:무시|잊)"),
    "reveal_system_prompt_multilingual": (
        r"\b(?:zeig|gib|nenn|verrat|wiederhol|schreib|druck)\w*\b[^.\n]{0,50}\b(?:system-?(?:prompt|anweisung|nachricht|eingabeaufforderung)\w*|grundanweisung\w*|(?:zentrale|versteckte|ursprüngliche|geheime)n?\s+anweisung\w*)"
        r"|\b(?:révèle|montre|affiche|donne|recopie|répète|écris)\w*\b[^.\n]{0,50}\b(?:(?:invite|prompt|message|instructions?|consignes)\s+(?:système|systeme|de\s+départ|initiales?|cachées?|de\s+formation))"
        r"|\b(?:mu[eé]stra|revela|dime|repite|enséñame|ensename|copia|escribe|mostre|revele|diga|repita|copie|escreva|mostra|rivela|dimmi|ripeti|scrivi)\w*\b[^.\n]{0,60}\b(?:(?:prompt|mensaje|instrucciones|mensagem|instruções|instrucoes|messaggio|istruzioni)\s+(?:del?\s+sistema|do\s+sistema|di\s+sistema|iniciais|iniciales|ocultas|nascoste|iniziali))"),
}
_COMPILED = {name: re.compile(rx, re.IGNORECASE) for name, rx in RULES.items()}


@dataclass(slots=True)
class RuleMatch:
    """A rule that fired, with the matched text (truncated for logs)."""

    rule: str
    excerpt: str


# A phrase quoted as an object of discussion: "the phrase 'ignore previous instructions'", "the paper 'Ignore
# Previous Prompt: ...'", "refuses the input \"...\"" (security questions, test code), not an instruction.
_QUOTES = {"'": "'", '"': '"', "\u201c": "\u201d", "\u2018": "\u2019", "`": "`"}
_MENTION = re.compile(r"\b(?:phrase|phrases|input|inputs|string|strings|text|words?|terms?|paper|article|titled|title|"
                      r"called|named|regex|pattern|sentence|example|examples|quoted)\W{0,3}$", re.IGNORECASE)
# Only rules that match a quotable phrase; a jailbreak's 'say "Stay in character!"' is still an instruction.
_MENTIONABLE = {"ignore_previous", "ignore_everything", "new_instructions", "reveal_system_prompt", "policy_evasion"}


def _quoted_mention(text: str, start: int, end: int) -> bool:
    """True when text[start:end] sits inside a quotation that a mention word (phrase, paper, input ...) introduces."""
    for i in range(start - 1, max(-1, start - 40), -1):
        close = _QUOTES.get(text[i])
        if close is not None:
            j = text.find(close, end)
            return j != -1 and j - end <= 120 and bool(_MENTION.search(text[max(0, i - 40):i]))
        if text[i] == "\n":
            return False
    return False


def match_rules(views: list[str]) -> list[RuleMatch]:
    """Return every rule that matches any of ``views`` (each rule at most once); a match inside a quoted
    mention (see :func:`_quoted_mention`) does not count."""
    found: list[RuleMatch] = []
    for name, rx in _COMPILED.items():
        for v in views:
            m = next((m for m in rx.finditer(v)
                      if name not in _MENTIONABLE or not _quoted_mention(v, m.start(), m.end())), None)
            if m:
                found.append(RuleMatch(name, m.group(0)[:80]))
                break
    return found
