"""The documentation as a reader uses it.

The README is a front page (under 220 lines, the two commands first) that links every page of docs/;
every relative link in the README and docs/*.md resolves, anchors included; and docs/extending.md's
steps, run with that page's own code blocks, add a model family and a compression method that train
through ``src.train``.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from src.methods.types import MLPWeights
from src.train import train
from src.utils.errors import ConfigError
from tests.conftest import ROOT, compose_with_searchpath

README = ROOT / "README.md"
DOCS = ROOT / "docs"
EXTENDING = DOCS / "extending.md"

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.M | re.S)
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.M)


def _prose(text: str) -> str:
    """The text without its fenced code blocks (a link inside code is not a link)."""
    return FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(h) for h in HEADING.findall(_prose(page.read_text()))}


def _links(page: Path) -> list[str]:
    return LINK.findall(_prose(page.read_text()))


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


# ---- the front page ----


def test_readme_is_a_front_page_that_starts_with_the_two_commands() -> None:
    text = README.read_text()
    assert len(text.splitlines()) < 220
    first = FENCE.search(text)
    assert first is not None and text[: first.start()].strip() == "# mlp-fusion"
    commands = [line.split("#")[0].strip() for line in first.group(3).splitlines()]
    assert commands == ["make train", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"^make ([\w-]+)", text, re.M):  # every make target the README names exists
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), target
    marks = '-m "not slow and not gpu and not deploy"'  # the README's test command selects what make test runs
    assert marks in text and marks in makefile


def test_readme_links_every_docs_page() -> None:
    local = [link for link in _links(README) if not re.match(r"\w+://", link)]
    linked = {(README.parent / link.split("#")[0]).resolve() for link in local}
    pages = [*DOCS.glob("*.md"), *(DOCS / "study").rglob("README.md")]
    missing = sorted(str(p.relative_to(ROOT)) for p in pages if p.resolve() not in linked)
    assert not missing, f"README.md does not link {missing}"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for link in _links(page):
        if re.match(r"\w+:", link):  # http(s)://, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(link)
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(link)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


# ---- docs/extending.md, followed step by step ----


def _section(heading: str) -> str:
    """The text of docs/extending.md from ``heading`` to the next heading of its level."""
    text = EXTENDING.read_text()
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def _blocks(section: str, lang: str) -> list[str]:
    """The section's fenced code blocks in ``lang``, dedented (a block may sit in a list item)."""
    return [textwrap.dedent(m.group(3)) for m in FENCE.finditer(section) if m.group(2) == lang]


@pytest.fixture
def clean_hydra():
    yield
    GlobalHydra.instance().clear()


def test_a_family_added_as_extending_md_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog,
                                             clean_hydra) -> None:
    from src.models.mlp_io import families

    section = _section("## Add a model family")
    (row_src,), (tiny_yaml,) = _blocks(section, "python"), _blocks(section, "yaml")
    # step 1: the row, as it would sit in ROWS
    row = eval(row_src.strip().rstrip(","), vars(families))  # noqa: S307  (the page's own code)
    assert isinstance(row, families.Family) and row.model_type not in families.FAMILIES
    monkeypatch.setitem(families.FAMILIES, row.model_type, row)
    # step 2: the tiny config the row names
    conf = tmp_path / "conf"
    (conf / "model").mkdir(parents=True)
    (conf / "model" / f"{row.tiny}.yaml").write_text(tiny_yaml)

    run = [f"model={row.tiny}", "task=rt_review", "ffn_mode=ntk_cluster", "approx_metrics.probe_size=4"]
    cfg, _ = compose_with_searchpath(conf, tmp_path, run)
    with caplog.at_level(logging.WARNING):
        metrics = train(cfg)
    assert "not in the table" not in caplog.text  # read by its row, not by the structural fallback
    assert metrics["fusion/params_after"] < metrics["fusion/params_before"] and "fusion/ntk_sign_rel_err" in metrics


def test_a_method_added_as_extending_md_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_hydra) -> None:
    import src.methods

    section = _section("## Add a compression method")
    (module_src,), yamls = _blocks(section, "python"), _blocks(section, "yaml")
    method_yaml = yamls[0]
    name = re.search(r"^name: (\w+)$", method_yaml, re.M).group(1)
    assert f"_target_: src.methods.{name}.compress" in method_yaml
    # step 1: src/methods/<name>.py (written under tmp_path, which joins the package's search path)
    pkg = tmp_path / "src" / "methods"
    pkg.mkdir(parents=True)
    (pkg / f"{name}.py").write_text(module_src)
    monkeypatch.setattr(src.methods, "__path__", [*src.methods.__path__, str(pkg)])
    importlib.invalidate_caches()
    module = importlib.import_module(f"src.methods.{name}")
    monkeypatch.setitem(sys.modules, f"src.methods.{name}", module)  # removed again after the test
    monkeypatch.setattr(src.methods, name, module, raising=False)
    # step 2: conf/ffn_mode/<name>.yaml
    conf = tmp_path / "conf"
    (conf / "ffn_mode").mkdir(parents=True)
    (conf / "ffn_mode" / f"{name}.yaml").write_text(method_yaml)

    run = ["model=tiny_bert", f"ffn_mode={name}", "ffn_mode.rescale=true", "approx_metrics.probe_size=4"]
    cfg, listed = compose_with_searchpath(conf, tmp_path, run)
    assert name in listed  # the registry found it

    # the contract the shared tests hold every method to, on a small random MLP
    fn = instantiate(cfg.ffn_mode.compress)
    g = torch.Generator().manual_seed(0)
    up, down, up_bias, down_bias = (torch.randn(*shape, generator=g) for shape in ((24, 8), (8, 24), (24,), (8,)))
    w = MLPWeights(up, down, up_bias, down_bias)
    a, b, c = (fn(w, 6, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.weights.up, b.weights.up) and not torch.equal(a.weights.up, c.weights.up)
    exact = module.compress(w, 24, seed=0)  # mid_dim = width keeps every neuron
    assert torch.equal(exact.weights.up, w.up) and torch.equal(exact.weights.down, w.down)
    with pytest.raises(ValueError, match="mid_dim"):
        fn(w, 0, seed=0)

    # the run: python -m src.train ffn_mode=<name> ffn_mode.rescale=true
    metrics = train(cfg)
    assert metrics["fusion/params_after"] < metrics["fusion/params_before"] and "test/acc" in metrics
    assert json.loads((tmp_path / "run" / "results.json").read_text())["ffn_mode"] == name

    # a bad option is refused by the module's check hook, in one sentence, before anything loads
    bad, _ = compose_with_searchpath(conf, tmp_path, ["model=tiny_bert", f"ffn_mode={name}", "ffn_mode.rescale=abc"])
    loaded = lambda *a, **k: pytest.fail("a model was loaded before the check")  # noqa: E731
    monkeypatch.setattr("src.train.build_data_and_module", loaded)
    with pytest.raises(ConfigError, match=r"^ffn_mode\.rescale='abc' must be true or false\.$"):
        train(bad)
