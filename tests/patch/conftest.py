"""Fixtures for the patch tests: a spy counting calls into the fused kernels (so an equivalence test
also proves the fused path ran), and a guard that no class-level patch leaks out of a test."""

import pytest

import clinkd.patch.attention as attention_mod
import clinkd.patch.loss as loss_mod
from clinkd.patch import _compat, api


@pytest.fixture
def fused_calls(monkeypatch):
    calls = {"attention": 0, "loss": 0}

    def spy(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(attention_mod, "mcg_rope_attention", spy("attention", attention_mod.mcg_rope_attention))
    monkeypatch.setattr(loss_mod, "linear_kd_loss", spy("loss", loss_mod.linear_kd_loss))
    return calls


@pytest.fixture(autouse=True)
def no_leaked_class_patch():
    yield
    leaked = list(api._CLASS_PATCHES)
    for cls in leaked:
        api.unpatch_qwen2_vl_classes(_compat.family_of_class(cls).name)
    assert not leaked, f"a test left class patches on {leaked}"
