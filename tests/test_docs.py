"""The documentation is a contract: every fenced ``bash`` and ``python`` block of README.md and docs/ runs as written.

Each page runs in a fresh folder holding what a reader of that page has (:func:`_workdir`: a small model as
``my_model``, tiles, synthetic slides named as in the docs, an original-format release with random weights, an
ImageNet-format ResNet-34 file with random weights, and the real dataset samples of ``../shared/data/real`` under
their released names where present), its blocks in order (:mod:`docs_runner`). A block may be preceded by a
directive comment, visible in the Markdown source, that says how the test runs it::

    <!-- docs-test
    replace: "--n 200" -> "--n 4"        # shortened: applied to the block before it runs (a comment says why)
    given: patches = np.zeros((2, 144, 144, 3), np.uint8)    # what the reader brings (runs first, hidden)
    skip: needs a GPU                    # not run, with the reason (a GPU, a cluster, a user's file)
    needs: shared                        # runs only where ../shared/data/real is present
    file: params.yaml                    # (any block) written to this file before the page's first block
    -->

A ``replace`` whose text is not in the block fails the test, so a shortening cannot outlive the block it shortens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REAL_DATA, REPO, calibrate

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: the pages that take longest (measured: 70-100 s each on 2 cores) start first, so that no long page runs alone at
#: the end while the other worker idles
SLOWEST_FIRST = ("training.md", "api.md", "your-data.md", "commands.md", "README.md")
FENCE = re.compile(r"^```(\w*)\s*$")
DIRECTIVE = re.compile(r"<!--\s*docs-test\s*\n(.*?)-->\s*$", re.S)
REPLACE = re.compile(r'^"(.*)"\s*->\s*"(.*)"$')
KEYS = ("replace", "given", "skip", "needs", "file")


@dataclass
class Block:
    page: str
    line: int
    lang: str
    code: str
    replace: list[tuple[str, str]] = field(default_factory=list)
    given: list[str] = field(default_factory=list)
    skip: str | None = None
    needs: list[str] = field(default_factory=list)
    file: str | None = None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    def runnable(self) -> str:
        code = self.code
        for old, new in self.replace:
            assert old in code, f"{self.where}: replace {old!r}: not in the block (the block changed?)"
            code = code.replace(old, new)
        return "\n".join([*self.given, code])


def parse(path: Path) -> list[Block]:
    """The bash and python blocks of a Markdown page with their directives."""
    lines = path.read_text(encoding="utf-8").splitlines()
    page = str(path.relative_to(REPO))
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        block = Block(page, i + 1, m.group(1), "\n".join(lines[i + 1:end]))
        k = i - 1  # a directive ends on the line just above the fence
        while k >= 0 and lines[k].strip() and not lines[k].lstrip().startswith("<!--"):
            k -= 1
        if k >= 0 and lines[k].lstrip().startswith("<!--") and lines[i - 1].rstrip().endswith("-->"):
            d = DIRECTIVE.match("\n".join(lines[k:i]).strip())
            if d:
                _apply(block, d.group(1))
        if block.lang in ("bash", "python") or block.file:
            blocks.append(block)
        i = end + 1
    return blocks


def _apply(block: Block, text: str) -> None:
    for raw in text.splitlines():
        if not raw.strip():
            continue
        key, sep, value = raw.strip().partition(":")
        assert sep and key in KEYS, f"{block.where}: unknown docs-test directive line {raw!r} (keys: {KEYS})"
        value = value.strip()
        if key == "replace":
            value = re.sub(r"\s+#\s.*$", "", value)  # a comment may say why
            m = REPLACE.match(value)
            assert m, f"{block.where}: replace takes '\"old\" -> \"new\"', got {value!r}"
            block.replace.append((m.group(1).replace('\\"', '"'), m.group(2).replace('\\"', '"')))
        elif key == "given":
            block.given.append(value)
        elif key == "skip":
            block.skip = value
        elif key == "file":
            block.file = value
        else:
            block.needs.append(value)


def test_every_page_parses_and_every_block_is_run_or_says_why():
    """Cheap and not slow: directives are well formed and every block is run or skipped with a reason."""
    blocks = [b for p in PAGES for b in parse(p)]
    assert len(blocks) > 40
    for b in blocks:
        assert b.lang in ("bash", "python") or not b.given, f"{b.where}: given is for bash and python blocks"
        b.runnable()  # every replace applies
        assert b.skip is None or len(b.skip) > 10, f"{b.where}: say why the block is skipped"


# ---- what a reader has ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    """Made once: a tiny model at 0.5 um/px with BatchNorm statistics, two tiles, a synthetic slide, an
    original-format release and an ImageNet-format ResNet-34 (random weights), the demo figure's inputs."""
    import cv2
    import torch

    from cerberus_histo import Cerberus, ModelConfig
    from cerberus_histo.data.slide import write_synthetic_slide
    from cerberus_histo.data.synthetic import synth_tile

    root = tmp_path_factory.mktemp("docs-assets")
    torch.manual_seed(0)
    net = Cerberus(ModelConfig.preset("original", encoder="tiny", head_channels=8, mpp=0.5))
    calibrate(net)
    net.eval().save(root / "my_model")
    (root / "tiles").mkdir()
    for i in range(2):
        cv2.imwrite(str(root / "tiles" / f"tile{i}.png"), synth_tile(256, seed=i).image[..., ::-1])
    shutil.copy(root / "tiles" / "tile0.png", root / "tile.png")
    write_synthetic_slide(root / "slide.tif", 1024, 768, seed=3, field=512, offset=128, n_fields=2, tile=256,
                          progress=False)
    sys.path.insert(0, str(REPO / "tests"))
    from original_net import SETTINGS, OriginalNet, randomise
    from test_checkpoint import _write_original

    _write_original(root / "cerberus_release", randomise(OriginalNet()).state_dict(), SETTINGS)
    from cerberus_histo.models.encoders import build_encoder

    torch.save(build_encoder("resnet34").state_dict(), root / "resnet34-b627a593.pth")
    return root


def _workdir(assets: Path, folder: Path) -> Path:
    """A reader's folder: files named as the docs name them."""
    folder.mkdir()
    shutil.copytree(assets / "my_model", folder / "my_model")
    shutil.copytree(assets / "tiles", folder / "tiles")
    shutil.copy(assets / "tile.png", folder / "tile.png")
    slide = assets / "slide.tif"
    for name in ("slide.svs", "a.svs", "b.ndpi", "slides/s1.svs", "slides/s2.svs", "cohort/c1.svs"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).symlink_to(slide)
    (folder / "masks").mkdir()
    for rel in ("cerberus_release", "path/to/cerberus_release", "resnet34-b627a593.pth"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).symlink_to(assets / Path(rel).name)
    if REAL_DATA.is_dir():  # the releases under the names their archives unpack to
        for release in REAL_DATA.glob("*/*"):
            if release.is_dir():
                (folder / release.name).symlink_to(release)
    return folder


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _plan(page: Path) -> tuple[list[dict], list[str]]:
    """The blocks of ``page`` to run (files first: a page's files are there before its commands) and the reasons
    of those skipped."""
    todo, skipped = [], []
    for b in parse(page):
        if b.skip:
            skipped.append(f"{b.where}: {b.skip}")
        elif "shared" in b.needs and not REAL_DATA.is_dir():
            skipped.append(f"{b.where}: ../shared/data/real is absent")
        else:
            todo.append({"where": b.where, "lang": "file" if b.file else b.lang, "code": b.runnable(),
                         "file": b.file})
    todo.sort(key=lambda b: b["lang"] != "file")
    return todo, skipped


def _run_page(page: Path, assets: Path, folder: Path) -> subprocess.CompletedProcess:
    todo, _ = _plan(page)
    work = _workdir(assets, folder / "work")
    (folder / "blocks.json").write_text(json.dumps(todo))
    return subprocess.run([sys.executable, str(REPO / "tests" / "docs_runner.py"), str(folder / "blocks.json")],
                          cwd=work, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=900)


@pytest.fixture(scope="session")
def page_runs(request, assets, tmp_path_factory):
    """Every selected page started at once, two at a time (one torch thread each: the pages are independent, and
    two of them keep 2 cores busy); each test waits for its own page."""
    pages = [item.callspec.params["page"] for item in request.session.items
             if getattr(item, "originalname", "") == "test_page_runs_as_written" and _plan(item.callspec.params["page"])[0]]
    pages.sort(key=lambda page: SLOWEST_FIRST.index(page.name) if page.name in SLOWEST_FIRST else len(SLOWEST_FIRST))
    with ThreadPoolExecutor(2) as pool:
        yield {page: pool.submit(_run_page, page, assets, tmp_path_factory.mktemp("page")) for page in pages}


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_page_runs_as_written(page, page_runs):
    todo, skipped = _plan(page)
    if not todo:
        pytest.skip("no block to run: " + "; ".join(skipped) if skipped else "no code blocks")
    proc = page_runs[page].result()
    assert proc.returncode == 0 and "DOCS PAGE PASSED" in proc.stdout, proc.stdout[-8000:]
