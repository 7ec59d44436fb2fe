"""Every link in the README files and docs/ points at something that exists: files, headings, and
code line anchors (#L10-L20) that start at the definition the link names and cover all of it."""
import glob
import os
import re

import pytest
from conftest import ROOT

LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)\)")
LINES = re.compile(r"^L(\d+)(?:-L(\d+))?$")


def markdown_files() -> list[str]:
    files = [os.path.join(ROOT, name) for name in ("README.md", "README.en.md", "BENCHMARKS.md", "babyllama/README.md")]
    return files + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def heading_slugs(path: str) -> set[str]:
    """GitHub's anchors: lower case, punctuation dropped (CJK kept), spaces to hyphens."""
    slugs = set()
    with open(path, encoding="utf-8") as f:
        in_code = False
        for line in f:
            in_code ^= line.startswith("```")
            if not in_code and line.startswith("#"):
                title = line.lstrip("#").strip().lower()
                slugs.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return slugs


def links(path: str) -> list[tuple[int, str, str]]:
    """(line number, text, target) of every Markdown link of the file, outside code blocks."""
    found = []
    with open(path, encoding="utf-8") as f:
        in_code = False
        for number, line in enumerate(f, 1):
            in_code ^= line.startswith("```")
            if not in_code:
                found += [(number, text, target) for text, target in LINK.findall(line)]
    return found


def check_link(path: str, text: str, target: str) -> str | None:
    """What is wrong with the link, or None."""
    if re.match(r"^[a-z]+:", target):
        return None  # a web address: not checked offline
    file, _, anchor = target.partition("#")
    resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
    if not os.path.exists(resolved):
        return f"{file} does not exist"
    if not anchor:
        return None
    lines = LINES.match(anchor)
    if lines is None:
        if anchor not in heading_slugs(resolved):
            return f"no heading #{anchor} in {file or 'this file'}"
        return None
    with open(resolved, encoding="utf-8") as f:
        code = f.read().split("\n")
    first, last = int(lines.group(1)), int(lines.group(2) or lines.group(1))
    if not 1 <= first <= last <= len(code):
        return f"lines {first}-{last} are outside {file} ({len(code)} lines)"
    name = re.fullmatch(r"`([^`]+)`", text)
    if name:
        symbol = name.group(1).split(".")[-1].removesuffix("()")
        start = first - 1
        while start < last - 1 and code[start].lstrip().startswith("@"):
            start += 1  # decorators belong to the definition below them
        if symbol not in code[start]:
            return f"`{symbol}` is not on line {start + 1} of {file}: the code moved, update the anchor"
        owner = name.group(1).split(".")[-2] if "." in name.group(1) else ""
        if owner[:1].isupper() and code[start][:1].isspace():  # Class.method: the method of that class
            enclosing = next((line for line in reversed(code[:start]) if line.startswith("class ")), "")
            if not re.match(rf"class {re.escape(owner)}\b", enclosing):
                return f"line {start + 1} of {file} is not in class {owner}: the code moved, update the anchor"
        if re.match(rf"\s*(async def|def|class) {re.escape(symbol)}\b", code[start]):
            end = block_end(code, start)
            if last != end + 1:
                return f"`{symbol}` spans lines {first}-{end + 1} of {file}, the link says {first}-{last}"
    return None


def block_end(code: list[str], start: int) -> int:
    """Index of the last line of the def/class that starts at code[start] (by indentation)."""
    indent = len(code[start]) - len(code[start].lstrip())
    end = start
    for i in range(start + 1, len(code)):
        line = code[i]
        if line.strip() and len(line) - len(line.lstrip()) <= indent and not line.lstrip().startswith((")", "]")):
            break
        if line.strip():
            end = i
    return end


def commands() -> list[str]:
    """Every .py at the root but the three library files the seed's users look for there."""
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py"))
                  if os.path.basename(p) not in ("model.py", "dataset.py", "dataset_sft.py"))


def test_every_command_is_in_both_file_maps_and_the_docs():
    docs = "".join(open(p, encoding="utf-8").read() for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    for readme in ("README.md", "README.en.md"):
        with open(os.path.join(ROOT, readme), encoding="utf-8") as f:
            text = f.read()
        assert not [c for c in commands() if f"`{c}`" not in text], readme
    assert not [c for c in commands() if c not in docs]


def test_every_library_module_is_in_the_package_readme():
    with open(os.path.join(ROOT, "babyllama", "README.md"), encoding="utf-8") as f:
        text = f.read()
    modules = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "babyllama", "*.py"))
                     if not p.endswith("__init__.py"))
    assert not [m for m in modules if f"`{m}`" not in text]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_links_point_at_what_exists(path):
    assert os.path.isfile(path)
    problems = [f"{os.path.relpath(path, ROOT)}:{n}: [{text}]({target}): {problem}"
                for n, text, target in links(path) for problem in [check_link(path, text, target)] if problem]
    assert not problems, "\n".join(problems)


def test_code_references_are_checked(tmp_path):
    (tmp_path / "code.py").write_text("def alpha():\n    return 1\n")
    doc = str(tmp_path / "doc.md")
    assert check_link(doc, "`alpha`", "code.py#L1-L2") is None
    assert "not on line" in check_link(doc, "`beta`", "code.py#L1-L2")
    assert "spans lines 1-2" in check_link(doc, "`alpha`", "code.py#L1")
    assert "outside" in check_link(doc, "`alpha`", "code.py#L1-L9")
    (tmp_path / "classes.py").write_text("class A:\n    def run(self):\n        pass\n\n\nclass B:\n"
                                         "    def run(self):\n        pass\n")
    assert check_link(doc, "`B.run`", "classes.py#L7-L8") is None
    assert "not in class B" in check_link(doc, "`B.run`", "classes.py#L2-L3")
    assert "does not exist" in check_link(doc, "x", "missing.py")
    (tmp_path / "doc.md").write_text("# 第一章 Model\n")
    assert check_link(doc, "x", "#第一章-model") is None
    assert "no heading" in check_link(doc, "x", "#第二章")
