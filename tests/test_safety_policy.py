"""Policy YAML: defaults, per-key overrides, and errors that name what to fix."""
import pytest

from servelm.safety import Policy, PolicyError

YAML = """
max_input_chars: 1000
fail_mode: open
canary: c-123
scanners:
  pii: {threshold: 0.6, action: block, entities: [EMAIL_ADDRESS]}
  prompt_injection: {action: review}
api_keys:
  sk-team:
    scanners: {pii: {action: allow}}
"""


def test_yaml_policy_and_api_key_override(tmp_path):
    f = tmp_path / "policy.yaml"
    f.write_text(YAML)
    p = Policy.from_yaml(f)
    assert p.max_input_chars == 1000 and p.fail_mode == "open" and p.canary == "c-123"
    assert p.scanner("pii").action == "block" and p.scanner("pii").threshold == 0.6
    assert p.scanner("pii").entities == ["EMAIL_ADDRESS"]
    assert p.scanner("injection_rules").action == "block"  # untouched default
    k = p.for_api_key("sk-team")
    assert k.scanner("pii").action == "allow" and k.scanner("pii").threshold == 0.6
    assert p.for_api_key("sk-unknown") is p
    assert p.fail_mode_for("pii") == "open"


@pytest.mark.parametrize("text,needle", [
    ("scanners: {pii: {action: nuke}}", "policy.scanners.pii.action"),
    ("scanners: {pii: {threshold: 3}}", "threshold must be in [0, 1]"),
    ("scanners: {pii: {treshold: 0.3}}", "policy.scanners.pii.treshold: unknown setting"),
    ("fail_mode: sideways", "fail_mode"),
    ("max_input_chars: -5", "max_input_chars"),
    ("colour: blue", "policy.colour: unknown key"),
    ("- a\n- b", "YAML mapping"),
    ("scanners: [", "not valid YAML"),
])
def test_bad_policy_errors_name_the_key(text, needle):
    with pytest.raises(PolicyError) as e:
        Policy.from_yaml_text(text)
    assert needle in str(e.value)


def test_missing_file():
    with pytest.raises(PolicyError, match="not found"):
        Policy.from_yaml("/nonexistent/policy.yaml")


def test_shipped_default_policy_file_matches_defaults():
    from pathlib import Path

    import servelm.safety

    p = Policy.from_yaml(Path(servelm.safety.__file__).parent / "policies" / "default.yaml")
    d = Policy()
    for name, sp in d.scanners.items():
        assert (p.scanner(name).action, p.scanner(name).enabled) == (sp.action, sp.enabled), name
    assert p.fail_mode == d.fail_mode and p.max_input_chars == d.max_input_chars
