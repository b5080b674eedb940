"""Label values: sanitizing, and random client model names never adding series."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexus.metrics import sanitize_label
from tests.test_metrics_support import label_values, make_collector, record_request

VALID = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
KNOWN_MODELS = {"llama3:70b", "mistral:7b", "gpt-4"}


@pytest.mark.parametrize(
    ("raw", "label"),
    [
        ("llama3:70b", "llama3_70b"),
        ("4o", "_4o"),
        ("gpu-a", "gpu_a"),
        ("cpu.c", "cpu_c"),
        ("", "_"),
        ("_", "_"),
        ("ÄÖÜ-model", "____model"),
        ("模型", "__"),
        ("hf.co/org/model:Q4_K_M", "hf_co_org_model_Q4_K_M"),
        ("a b\"c\\d\ne", "a_b_c_d_e"),
        ("9", "_9"),
    ],
)
def test_sanitize_examples(raw: str, label: str) -> None:
    assert sanitize_label(raw) == label


@given(st.text())
def test_sanitized_labels_are_valid_ascii_and_idempotent(raw: str) -> None:
    label = sanitize_label(raw)
    assert VALID.match(label)
    assert label.isascii()
    assert sanitize_label(label) == label


@given(st.text(alphabet=st.characters(codec="ascii")))
def test_sanitizing_keeps_length_apart_from_the_digit_prefix(raw: str) -> None:
    label = sanitize_label(raw)
    assert len(label) == max(1, len(raw)) + (1 if raw[:1].isdigit() else 0)


@given(
    st.lists(
        st.one_of(st.none(), st.text(max_size=40)).filter(lambda n: n not in KNOWN_MODELS),
        max_size=60,
    ),
    st.sampled_from(["gpu-a", "gpu-b", None]),
)
def test_random_model_names_never_add_series(names: list[str | None], backend: str | None) -> None:
    collector, _ = make_collector()
    record_request(collector, "llama3:70b", "gpu-a", 200, 0.1)
    for name in names:
        record_request(collector, name, backend, 404, 0.01, error_type="no_backend")
        record_request(
            collector, "llama3:70b", backend, 200, 0.1, fallback_from=name, fallback_to=name
        )
    assert label_values(collector, "model") <= {"llama3_70b", "unknown"}
    assert label_values(collector, "from_model") <= {"llama3_70b", "unknown"}
    assert label_values(collector, "to_model") <= {"unknown"}
    # Nothing inside grows with the names either (the lookup cache included).
    assert len(collector.pairs) <= 3
    assert len(collector._lookup) <= 3
    assert {m.name for m in collector.stats().models} <= {"llama3:70b", "mistral:7b", "unknown"}
