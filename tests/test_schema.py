"""The config schema: every option of every group fits it, and the reference page is generated from it."""
import dataclasses

import pytest

from conftest import ROOT
from ddt.schema import GROUPS, all_keys, check_types, closest, reference_markdown

OPTIONS = [(g, p.stem) for g in (*GROUPS, "baseline") for p in sorted((ROOT / "conf" / g).glob("*.yaml"))]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))
NEEDS = ["ckpt=/weights/model.ckpt", "data.root=/d"]  # values some studies leave to the command line


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_of_every_group_composes_against_the_schema(compose, group, option):
    problems, _ = check_types(compose(f"{group}={option}"))
    assert problems == []


@pytest.mark.parametrize("study", EXPERIMENTS)
def test_every_study_composes_against_the_schema(compose, study):
    overrides = [f"+experiment={study}"]
    try:
        cfg = compose(*overrides, *NEEDS)
    except Exception:  # the study does not use data.root (pixel space)
        cfg = compose(*overrides, NEEDS[0])
    assert check_types(cfg)[0] == []


def test_the_reference_page_is_the_schemas_and_names_every_key():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == reference_markdown(ROOT / "conf"), "regenerate: python -m ddt.schema > docs/configuration.md"
    for key in all_keys():
        assert f"`{key}`" in page, key
    for group in GROUPS:
        assert f"`{group}=" in page  # its options are listed


def test_every_key_has_a_meaning():
    for schema in (*GROUPS.values(),):
        for f in dataclasses.fields(schema):
            assert len(f.metadata.get("help", "")) > 5, (schema.__name__, f.name)


def test_a_typo_is_answered_with_the_closest_key():
    assert closest("model.encoder_dept", all_keys()) == "; did you mean model.encoder_depth?"
    assert closest("sampler.cfg_sclae", all_keys()) == "; did you mean sampler.cfg_scale?"
    assert closest("zzz", all_keys()) == ""
