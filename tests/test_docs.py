"""The docs' examples run as they stand: a reader who pastes one gets what the page says."""

from __future__ import annotations

import pathlib
import re
import warnings

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(encoding="utf-8"), re.S)


@pytest.mark.parametrize("index", [
    pytest.param(0, id="plugins-detector-and-sink"),
    pytest.param(2, id="plugins-numpy-adapter"),
])
def test_plugins_page_examples_run(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = python_blocks("plugins.md")[index]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an example that warns would teach the wrong thing
        exec(compile(code, f"docs/plugins.md block {index}", "exec"), {"__name__": "example"})
    if index == 0:
        rows = (tmp_path / "findings.csv").read_text().splitlines()
        assert len(rows) == 1 and rows[0].startswith("demo,7,loss_spike,,warning,")


def test_the_first_plugins_example_is_the_detector():
    # The page promises its first block runs as it stands: keep the runnable one first.
    assert "class LossSpikeDetector" in python_blocks("plugins.md")[0]


# -- every reference in README.md and docs/ resolves ------------------------------------------
#
# A page that names a test, a command or another page makes a promise a reader can check; these
# keep the promise true when a test is renamed, a flag removed or a page moved.

ROOT = DOCS.parent
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def page_id(page: pathlib.Path) -> str:
    return page.relative_to(ROOT).as_posix()


def prose(text: str) -> str:
    """The page without its fenced blocks (their contents are code, not references)."""
    return FENCE.sub("", text)


def inline_code(text: str) -> list[str]:
    """Inline code spans of the prose, a span broken over lines joined by a space."""
    return [" ".join(span.split()) for span in re.findall(r"`([^`\n]+(?:\n[^`\n]+)*)`",
                                                          prose(text))]


def fenced_lines(text: str) -> list[str]:
    """Shell lines of the fenced blocks (in a ``console`` block only the ``$`` lines; its other
    lines are output): prompts, comments and `&&` chains taken apart, continuations joined."""
    lines = []
    for lang, block in re.findall(r"^```([^\n]*)\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if lang.strip() == "console" and not line.startswith("$ "):
                continue
            line = re.sub(r"\s+#.*$", "", re.sub(r"^\$ ", "", line))
            lines += [" ".join(part.split()) for part in line.split("&&")]
    return lines


def commands(text: str) -> list[str]:
    """Every ``gradwatch ...`` and ``python benchmarks/... | -m benchmarks....`` invocation the
    page quotes (an inline span that is only a command's name, `gradwatch report`, names it)."""
    found = []
    for cmd in inline_code(text) + fenced_lines(text):
        cmd = re.sub(r"^(?:(?:[A-Z_]+=\S*|time|/usr/bin/time|\.venv/bin/)\s*)+", "", cmd)
        if re.match(r"(?:python3? )?(?:benchmarks/\S+\.py|-m benchmarks\.)", cmd):
            found.append(cmd)
        elif cmd.startswith("gradwatch ") and len(cmd.split()) > 2 or cmd.startswith(
                "gradwatch -"):
            found.append(cmd)
    return found


def named_tests(text: str) -> list[str]:
    """``file.py::test`` references (``tests/`` prefix optional, a trailing ``[ids]`` dropped)."""
    return re.findall(r"\b((?:tests/)?[\w/]+\.py::[\w:]+)", text)


def defined_tests(path: pathlib.Path) -> set[str]:
    """``test_x`` and ``Class::test_x`` names defined in a test file."""
    import ast

    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {f"{node.name}::{f.name}" for f in node.body
                      if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return names


def missing_tests(text: str) -> list[str]:
    missing = []
    for ref in named_tests(text):
        file, name = ref.split("::", 1)
        path = ROOT / file if file.startswith("tests/") else ROOT / "tests" / file
        if not path.is_file() or name not in defined_tests(path):
            missing.append(ref)
    return missing


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_test_the_docs_name_exists(page):
    assert missing_tests(page.read_text(encoding="utf-8")) == []


def test_the_test_reference_check_sees_a_renamed_test():
    assert named_tests("see `test_cli.py::test_version_is_printed`") != []
    assert missing_tests("see `test_cli.py::test_version_is_printed`") == []
    assert missing_tests("`test_cli.py::test_no_such_thing[x]`, "
                         "`tests/test_nowhere.py::test_x`, "
                         "`test_detectors.py::TestNonFinite::test_stays_one_condition_while_nan"
                         "_persists`") == ["test_cli.py::test_no_such_thing",
                                           "tests/test_nowhere.py::test_x"]


def parse_error(cmd: str) -> str | None:
    """None when ``cmd`` parses against the real parser of the command it names, else argparse's
    message. Parsing runs nothing: the parsers are built by the same functions the commands use."""
    import contextlib
    import importlib.util
    import io
    import shlex
    import sys

    from gradwatch import _cli

    argv = shlex.split(cmd.replace("…", "X"))
    if argv[0] == "gradwatch":
        parser, args = _cli.build_parser(), argv[1:]
    else:
        if argv[0].startswith("python"):
            argv = argv[1:]
        if argv[0] == "-m":
            module, args = argv[1], argv[2:]
            path = ROOT / (module.replace(".", "/") + ".py")
        else:
            path, args = ROOT / argv[0], argv[1:]
            module = "docs_check_" + path.stem
        if not path.is_file():
            return f"no such script {path.relative_to(ROOT)}"
        if module not in sys.modules:
            sys.path[:0] = [str(ROOT), str(path.parent)]
            try:
                spec = importlib.util.spec_from_file_location(module, path)
                mod = importlib.util.module_from_spec(spec)
                sys.modules[module] = mod
                spec.loader.exec_module(mod)
            finally:
                del sys.path[:2]
        parser = sys.modules[module].parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as exc:
        if exc.code:
            return err.getvalue().strip().splitlines()[-1]
    return None


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_command_the_docs_quote_parses(page):
    text = page.read_text(encoding="utf-8")
    errors = {cmd: parse_error(cmd) for cmd in commands(text)}
    assert {cmd: e for cmd, e in errors.items() if e} == {}


def test_the_command_check_sees_a_removed_flag():
    text = ("Run `gradwatch demo --settings all`, then `gradwatch report`.\n\n"
            "```bash\n$ time gradwatch demo --seed 3   # no such flag\n"
            "OMP_NUM_THREADS=1 python benchmarks/check_cost.py --steps 10 \\\n  --rounds 2\n"
            "python -m benchmarks.field.run --only bert --truth\n```\n")
    assert commands(text) == ["gradwatch demo --settings all", "gradwatch demo --seed 3",
                              "python benchmarks/check_cost.py --steps 10 --rounds 2",
                              "python -m benchmarks.field.run --only bert --truth"]
    errors = [parse_error(cmd) for cmd in commands(text)]
    assert errors[0] is None and errors[3] is None
    assert "--seed" in errors[1] and "--rounds" in errors[2]


def anchors(page: pathlib.Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but ``-`` and ``_`` dropped, spaces
    to ``-``."""
    heads = re.findall(r"^#+\s+(.*?)\s*$", prose(page.read_text(encoding="utf-8")), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower().replace("`", "")).replace(" ", "-")
            for h in heads}


def broken_links(page: pathlib.Path, text: str) -> list[str]:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(text)):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_resolves(page):
    assert broken_links(page, page.read_text(encoding="utf-8")) == []


def test_the_link_check_sees_a_moved_page_and_a_renamed_heading():
    page = DOCS / "index.md"
    assert broken_links(page, "[a](experiments.md#the-failure-and-two-repairs) "
                              "[b](img/deep-relu-torch.png) [c](https://example.com/x)") == []
    assert broken_links(page, "[a](experiment.md) [b](experiments.md#no-such-heading)") == [
        "experiment.md", "experiments.md#no-such-heading"]
