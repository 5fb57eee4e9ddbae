"""The project's documents stay inside the repository and stay true to it.

(a) every docs file named in glm5/, tests/, benchmarks/, docs/, README.md, Makefile and pyproject.toml exists;
(b) every section citation (the docs path, a section sign, the heading; inside docs/ also a markdown link to the
file, or a bare section sign for the file itself) names a heading of that file; a section sign after a comma or
"and" continues the citation before it;
(c) no file in the tree names a design document outside the repository;
(d) relative markdown links (and their #anchors) in README.md and docs/*.md resolve;
(e) the package map of docs/architecture.md names every module of glm5/, and only existing ones;
(f) every repository path (glm5/..., tests/..., benchmarks/..., docs/...) named in README.md and docs/*.md exists;
(g) docs/performance.md has a section for every benchmark script in benchmarks/.

Each check is a function of the repository root returning its problems, so the last test runs them on a small
planted tree and checks that each catches its bad reference.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = "docs"  # spelled apart below so that this file names no docs path itself

SCANNED = ("glm5", "tests", "benchmarks", DOCS, "README.md", "Makefile", "pyproject.toml")
"""Where docs references are looked for (a, b)."""
SKIPPED_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "runs"}
TEXT_SUFFIXES = {
    ".py",
    ".md",
    ".toml",
    ".c",
    ".h",
    ".txt",
    ".json",
    ".yml",
    ".yaml",
    ".cfg",
    ".ini",
    ".sh",
    "",
}

DOC_PATH = re.compile(DOCS + r"/([A-Za-z0-9_-]+\.md)\b")
SECTION = "\N{SECTION SIGN} "
# Names of design documents that lived outside the repository, spelled so that this file does not match itself.
OUTSIDE = re.compile(
    r"shared" + r"/design|\.\./shared\b|\bMODEL" + r"_SPEC\b"
    r"|\b(?:ARCHITECTURE|PERFORMANCE|SERVING|DISTRIBUTED|DATA|STYLE|RL)\.md\b"
    r"|\b(?:SERVING|RL) " + SECTION
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def _text_files(root: Path, tops: tuple[str, ...] | None = None) -> list[Path]:
    """Text files under `tops` (files or folders relative to root; None = the whole tree), caches skipped."""
    starts = [root / t for t in tops] if tops is not None else [root]
    out = []
    for start in starts:
        if start.is_file():
            out.append(start)
            continue
        for folder, dirs, files in os.walk(start):
            dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info"))
            for name in sorted(files):
                path = Path(folder) / name
                if path.suffix in TEXT_SUFFIXES:
                    out.append(path)
    return out


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _outside_fences(text: str) -> list[tuple[int, str]]:
    """(line number, line) of a markdown text, without the lines of fenced code blocks."""
    out, fenced = [], False
    for i, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((i, line))
    return out


def headings(path: Path) -> list[str]:
    """The headings of a markdown file (code blocks excluded), as written after the #s."""
    return [
        line.lstrip("#").strip().rstrip("#").strip()
        for _, line in _outside_fences(_read(path))
        if re.match(r"#{1,6} ", line)
    ]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _where(root: Path, path: Path, lineno: int) -> str:
    return f"{path.relative_to(root)}:{lineno}"


# ------------------------------------------------------------------------------------------------- the checks
def missing_docs(root: Path) -> list[str]:
    """(a) docs files named somewhere that do not exist."""
    problems = []
    for path in _text_files(root, tuple(t for t in SCANNED if (root / t).exists())):
        for lineno, line in enumerate(_read(path).splitlines(), 1):
            for m in DOC_PATH.finditer(line):
                if not (root / DOCS / m.group(1)).is_file():
                    problems.append(f"{_where(root, path, lineno)}: {DOCS}/{m.group(1)} does not exist")
    return problems


def _cited_heading(rest: str, known: list[str]) -> str | None:
    """The longest heading `rest` starts with, ending at a word boundary (None: no heading matches)."""
    found = [h for h in known if rest.startswith(h) and (len(rest) == len(h) or not rest[len(h)].isalnum())]
    return max(found, key=len, default=None)


def bad_citations(root: Path) -> list[str]:
    """(b) section citations whose file or heading does not exist."""
    problems = []
    cache: dict[Path, list[str]] = {}
    for path in _text_files(root, tuple(t for t in SCANNED if (root / t).exists())):
        in_docs = path.parent == root / DOCS and path.suffix == ".md"
        text = _read(path)
        lines = _outside_fences(text) if in_docs else list(enumerate(text.splitlines(), 1))
        for lineno, line in lines:
            previous: Path | None = None
            for m in re.finditer(SECTION, line):
                before = line[: m.start()]
                prefix = r"(?:" + DOCS + r"/|\]\()" if in_docs else DOCS + "/"
                named = re.search(prefix + r"([A-Za-z0-9_-]+\.md)\)? $", before)
                if named:
                    target = root / DOCS / named.group(1)
                elif previous is not None and re.search(r"(,|\band) $", before):
                    target = previous
                elif in_docs:
                    target = path
                else:
                    continue  # a section sign that cites no docs file
                previous = target
                rest = line[m.end() :]
                if rest.startswith("<"):
                    continue  # a placeholder in prose that explains the syntax
                if not target.is_file():
                    problems.append(
                        f"{_where(root, path, lineno)}: {target.relative_to(root)} does not exist"
                    )
                    continue
                known = cache.setdefault(target, headings(target))
                if _cited_heading(rest, known) is None:
                    problems.append(
                        f"{_where(root, path, lineno)}: {target.relative_to(root)} has no heading at "
                        f"{SECTION}{rest.strip()[:60]!r}; its headings: {known}"
                    )
    return problems


def outside_references(root: Path) -> list[str]:
    """(c) any file naming a design document that lives outside the repository."""
    problems = []
    for path in _text_files(root):
        for lineno, line in enumerate(_read(path).splitlines(), 1):
            m = OUTSIDE.search(line)
            if m:
                problems.append(
                    f"{_where(root, path, lineno)}: names {m.group(0)!r}, a document outside the repository; "
                    f"cite {DOCS}/<file>.md instead"
                )
    return problems


def broken_links(root: Path) -> list[str]:
    """(d) relative links of README.md and docs/*.md that do not resolve (file, then #anchor)."""
    problems = []
    pages = [root / "README.md"] if (root / "README.md").is_file() else []
    pages += sorted((root / DOCS).glob("*.md"))
    for page in pages:
        for lineno, line in _outside_fences(_read(page)):
            for m in LINK.finditer(line):
                target = m.group(1)
                if re.match(r"[a-z][a-z0-9+.-]*:", target):
                    continue  # http:, https:, mailto:
                file_part, _, anchor = target.partition("#")
                dest = (page.parent / file_part).resolve() if file_part else page
                if not dest.exists() or root.resolve() not in (dest, *dest.parents):
                    problems.append(
                        f"{_where(root, page, lineno)}: link {target!r} leads to no file in the repo"
                    )
                elif anchor and dest.suffix == ".md" and anchor not in {slug(h) for h in headings(dest)}:
                    problems.append(f"{_where(root, page, lineno)}: link {target!r}: no such heading anchor")
    return problems


def unmapped_modules(root: Path) -> list[str]:
    """(e) modules of glm5/ missing from the package map of docs/architecture.md, and map entries that do not exist."""
    arch = root / DOCS / "architecture.md"
    if not arch.is_file():
        return [f"{DOCS}/architecture.md does not exist"]
    text = _read(arch)
    block = re.search(r"## Package map\n.*?```text\n(.*?)```", text, re.S)
    if block is None:
        return [f"{DOCS}/architecture.md has no ```text block under '## Package map'"]
    mapped, folder = set(), None
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        first = line.split()[0]
        if not line.startswith(" "):
            folder = first if first.endswith("/") else None
            if first.startswith("glm5/") and not first.endswith("/"):
                mapped.add(first)
        elif folder is not None and folder.startswith("glm5/"):
            mapped.add(folder + first)
    actual = {
        p.relative_to(root).as_posix()
        for p in (root / "glm5").rglob("*")
        if p.suffix in (".py", ".c")
        and "__pycache__" not in p.parts
        and not (p.name == "__init__.py" and p.parent != root / "glm5")
    }
    problems = [
        f"{m}: not in the package map of {DOCS}/architecture.md (add one line)"
        for m in sorted(actual - mapped)
    ]
    problems += [
        f"{m}: in the package map of {DOCS}/architecture.md but not in glm5/" for m in sorted(mapped - actual)
    ]
    return problems


REPO_PATH = re.compile(
    r"(?<![\w/.-])((?:glm5|tests|benchmarks|"
    + DOCS
    + r")/(?:[A-Za-z0-9_.-]+/)*(?:[A-Za-z0-9_-]+\.(?:py|c|json|md|png|toml)\b)?)"
)


def missing_paths(root: Path) -> list[str]:
    """(f) files and folders of the repository named in README.md and docs/*.md that do not exist."""
    problems = []
    pages = [root / "README.md"] if (root / "README.md").is_file() else []
    for page in pages + sorted((root / DOCS).glob("*.md")):
        for lineno, line in enumerate(_read(page).splitlines(), 1):
            for m in REPO_PATH.finditer(line):
                path = m.group(1)
                if line[m.end() : m.end() + 1] in ("{", "*", "<"):
                    continue  # a pattern (glm5/engine/{a,b}.py, results/<name>.md), not one path
                if not (root / path).exists():
                    problems.append(
                        f"{_where(root, page, lineno)}: {path} does not exist (moved? update the text)"
                    )
    return problems


def unlisted_benchmarks(root: Path) -> list[str]:
    """(g) benchmark scripts without a heading of their own in docs/performance.md."""
    perf = root / DOCS / "performance.md"
    known = set(headings(perf)) if perf.is_file() else set()
    return [
        f"{p.relative_to(root)}: no '### {p.name}' section in {DOCS}/performance.md (what it measures, command, peer)"
        for p in sorted((root / "benchmarks").glob("bench_*.py"))
        if p.name not in known
    ]


CHECKS = [
    missing_docs,
    bad_citations,
    outside_references,
    broken_links,
    unmapped_modules,
    missing_paths,
    unlisted_benchmarks,
]


# ------------------------------------------------------------------------------------------------- the repository
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_the_repository_passes(check) -> None:  # noqa: ANN001
    problems = check(ROOT)
    assert not problems, "\n".join(problems)


def test_the_documents_exist_and_cite_real_headings() -> None:
    names = {p.name for p in (ROOT / DOCS).glob("*.md")}
    assert {"architecture.md", "model.md", "serving.md", "rl.md", "performance.md", "engine.md"} <= names
    assert "Package map" in headings(ROOT / DOCS / "architecture.md")


# ------------------------------------------------------------------------------------------------- the checker
def _planted_tree(root: Path) -> None:
    """A minimal repository whose references are all good."""
    (root / DOCS).mkdir()
    (root / "glm5" / "sub").mkdir(parents=True)
    (root / DOCS / "a.md").write_text(
        "# A\n\n## Good heading\n\nSee [b](b.md#other-part) and § Good heading.\n\n```\n# not a heading\n```\n"
    )
    (root / DOCS / "b.md").write_text("# B\n\n## Other part\n\nBack to [a](a.md) § Good heading, § A.\n")
    (root / DOCS / "architecture.md").write_text(
        "# Map\n\n## Package map\n\n```text\nglm5/x.py      one module\nglm5/sub/      a folder\n"
        "  y.py         another\n```\n"
    )
    (root / "glm5" / "x.py").write_text(f'"""See {DOCS}/a.md {SECTION}Good heading and {DOCS}/b.md."""\n')
    (root / "benchmarks").mkdir()
    (root / "benchmarks" / "bench_one.py").write_text("")
    (root / DOCS / "performance.md").write_text("# P\n\n### bench_one.py\n")
    (root / "glm5" / "sub" / "__init__.py").write_text("")
    (root / "glm5" / "sub" / "y.py").write_text(f"# {DOCS}/b.md {SECTION}Other part, {SECTION}B\n")
    (root / "README.md").write_text(
        f"# R\n\n[arch]({DOCS}/architecture.md#package-map) maps glm5/x.py, glm5/sub/ and glm5/{{x,sub}}.\n"
    )


@pytest.mark.parametrize(
    "check, plant",
    [
        (missing_docs, lambda r: (r / "glm5" / "x.py").write_text(f"# {DOCS}/nowhere.md\n")),
        (bad_citations, lambda r: (r / "glm5" / "x.py").write_text(f"# {DOCS}/a.md {SECTION}Bad heading\n")),
        (
            bad_citations,
            lambda r: (r / "glm5" / "x.py").write_text(
                f"# {DOCS}/a.md {SECTION}Good heading, {SECTION}Nope\n"
            ),
        ),
        (
            bad_citations,
            lambda r: (r / DOCS / "b.md").write_text("# B\n\n## Other part\n\nSee § Missing part.\n"),
        ),
        (
            bad_citations,
            lambda r: (r / DOCS / "b.md").write_text("# B\n\n## Other part\n\nSee [a](a.md) § Other part.\n"),
        ),
        (
            outside_references,
            lambda r: (r / "glm5" / "x.py").write_text("# see MODEL" + "_SPEC " + SECTION + "3\n"),
        ),
        (
            outside_references,
            lambda r: (r / "Makefile").write_text("# ../" + "shared/" + "design/notes.md\n"),
        ),
        (outside_references, lambda r: (r / "glm5" / "x.py").write_text("# RL" + ".md A.7\n")),
        (broken_links, lambda r: (r / "README.md").write_text("[x](nowhere/file.md)\n")),
        (broken_links, lambda r: (r / DOCS / "a.md").write_text("# A\n\n[b](b.md#no-such-part)\n")),
        (unmapped_modules, lambda r: (r / "glm5" / "sub" / "z.py").write_text("")),
        (unmapped_modules, lambda r: (r / "glm5" / "x.py").unlink()),
        (unlisted_benchmarks, lambda r: (r / "benchmarks" / "bench_two.py").write_text("")),
        (
            missing_paths,
            lambda r: (r / DOCS / "b.md").write_text("# B\n\n## Other part\n\nSee `glm5/gone.py`.\n"),
        ),
        (
            missing_paths,
            lambda r: (r / "README.md").write_text("# R\n\nThe folder glm5/nothing/ holds it.\n"),
        ),
    ],
)
def test_each_check_catches_its_planted_bad_reference(tmp_path: Path, check, plant) -> None:  # noqa: ANN001
    _planted_tree(tmp_path)
    for each in CHECKS:
        assert each(tmp_path) == [], each.__name__  # the good tree passes every check
    plant(tmp_path)
    problems = check(tmp_path)
    assert len(problems) == 1, problems
