"""RCT settings and the reflection template: each bad value refused with its key."""

from __future__ import annotations

import pytest

from clinkd.rct.settings import DEFAULT_TEMPLATE, RCTSettings, fill_template, template_problem


def test_the_default_template_has_every_slot():
    assert template_problem(DEFAULT_TEMPLATE) is None
    text = fill_template(
        DEFAULT_TEMPLATE, question="Where?", answer="here <|im_end|> <|image_pad|>", ground_truth="there"
    )
    assert "Where?" in text and "there" in text and "<|" not in text  # control tokens of the answer removed


@pytest.mark.parametrize(
    "template, message",
    [
        ("Correct this: {answer}", "no {ground_truth} slot"),
        ("{ground_truth} {reason}", "unknown slot"),
        ("{ground_truth} {", "not a format string"),
        ("{ground_truth} <|im_start|>", "control token"),
        (42, "must be a string"),
    ],
)
def test_bad_templates(template, message):
    assert message in template_problem(template)
    with pytest.raises(ValueError, match="template"):
        RCTSettings(template=template)


def test_literal_braces_are_allowed():
    assert template_problem("{{json}} {ground_truth}") is None


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"rounds": 0}, "rounds"),
        ({"candidates": 0}, "candidates"),
        ({"candidates": 1.5}, "candidates"),
        ({"every": "hour"}, "every"),
        ({"every": "steps"}, "steps"),
        ({"steps": 3}, "steps"),
        ({"sample": 0}, "sample"),
        ({"sample": 0.0}, "sample"),
        ({"sample": 1.5}, "sample"),
        ({"temperature": 0}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.1}, "top_p"),
        ({"mode": "merge"}, "mode"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_new_tokens": True}, "max_new_tokens"),
    ],
)
def test_bad_settings_name_their_key(kwargs, key):
    with pytest.raises(ValueError) as error:
        RCTSettings(**kwargs)
    assert str(error.value).startswith(key)


def test_good_settings():
    RCTSettings(every="steps", steps=5, sample=0.25, candidates=1, mode="join")
    RCTSettings(sample=10)
