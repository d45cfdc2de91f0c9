"""The Dockerfiles stay consistent with the package layout; no Docker engine needed.

For every Dockerfile that the Makefile's `images` target builds (its IMAGES list):
(a) each file it copies from the build context exists, and .dockerignore does not drop it;
    it copies only the shared core (pyproject.toml, constraints.txt, README.md, src/) and its
    own folder (DESIGN.md, Layout);
(b) the final stage's ENTRYPOINT is exec-form `python -m <pkg>`, <pkg> a package with a
    __main__.py inside a folder it copied;
(c) the extras it installs (`pip install ".[x]"`) exist in pyproject.toml;
(d) the final stage's USER is a numeric, non-zero UID (what runAsNonRoot can verify);
(e) every deployable package (operator/rollfleet_*, services/*/rollfleet_*) has an image.
Besides: base images carry an explicit tag other than `latest`, the final stage exposes
8080, and the operator's default image references name images that `make images` builds.
`test_checks_catch_a_bad_dockerfile` shows each check failing on a bad Dockerfile.

The parser is deliberately small: instructions, comments, `\\` line continuations and JSON
(exec) form; it rejects what it does not know (heredocs, a changed escape character)
rather than misread it.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CORE = {"pyproject.toml", "constraints.txt", "README.md", "src"}
PORT = "8080"
KEYWORDS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK",
    "LABEL", "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip


# --- parsing ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    value: str  # the arguments, continuation lines joined with a space
    line: int  # where it starts (1-based)

    def exec_form(self) -> list[str] | None:
        """The JSON-array arguments (`["python", "-m", "x"]`), or None for shell form."""
        if not self.value.startswith("["):
            return None
        try:
            args = json.loads(self.value)
        except json.JSONDecodeError:
            return None  # Docker, too, runs a malformed array as a shell command
        if isinstance(args, list) and all(isinstance(a, str) for a in args):
            return args
        return None


def parse_dockerfile(text: str) -> list[Instruction]:
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#"):
            if re.match(r"#\s*escape\s*=", stripped) and not instructions and not parts:
                raise ValueError(f"line {number}: only the default escape character is parsed")
            continue  # a comment, or a parser directive, also inside a continuation
        if not stripped:
            continue  # blank, also inside a continuation (Docker skips those, too)
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        keyword, _, value = " ".join(p for p in parts if p).partition(" ")
        parts = []
        keyword = keyword.upper()
        if keyword not in KEYWORDS:
            raise ValueError(f"line {start}: unknown instruction {keyword!r}")
        if keyword in ("RUN", "COPY", "ADD") and re.search(r"<<-?[\"']?[A-Za-z_]", value):
            raise ValueError(f"line {start}: heredocs are not parsed")
        instructions.append(Instruction(keyword, value.strip(), start))
    if parts:
        raise ValueError(f"line {start}: the file ends inside a line continuation")
    return instructions


def split_stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """One list per FROM (each starting with it); ARGs before the first FROM are dropped."""
    stages: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            stages.append([ins])
        elif stages:
            stages[-1].append(ins)
    return stages


def _flags_and_args(ins: Instruction) -> tuple[dict[str, str], list[str]]:
    """`--from=build a b c` -> ({"from": "build"}, ["a", "b", "c"]); JSON form too."""
    flags: dict[str, str] = {}
    rest = ins.value
    while flag := re.match(r"--([\w-]+)(?:=(\S*))?\s+", rest):
        flags[flag.group(1)] = flag.group(2) or ""
        rest = rest[flag.end() :]
    as_exec = Instruction(ins.keyword, rest, ins.line).exec_form()
    return flags, as_exec if as_exec is not None else shlex.split(rest)


def copy_sources(instructions: list[Instruction]) -> list[tuple[int, str]]:
    """(line, source) of every COPY/ADD from the build context (not --from another stage)."""
    out = []
    for ins in instructions:
        if ins.keyword not in ("COPY", "ADD"):
            continue
        flags, args = _flags_and_args(ins)
        if "from" in flags:
            continue
        out += [(ins.line, src) for src in args[:-1]]
    return out


def _normal(source: str) -> str:
    return source.removeprefix("./").rstrip("/") or "."


def base_images(instructions: list[Instruction]) -> list[tuple[int, str]]:
    """(line, image) of every FROM that names an image rather than an earlier stage, with
    the defaults of the ARGs declared before the first FROM filled in."""
    out, stage_names, args = [], set(), {}
    for ins in instructions:
        if ins.keyword == "ARG" and not stage_names and not out:
            name, _, default = ins.value.partition("=")
            args[name.strip()] = default.strip().strip("\"'")
        if ins.keyword != "FROM":
            continue
        tokens = [t for t in ins.value.split() if not t.startswith("--")]
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), tokens[0])
        if image.lower() not in stage_names:
            out.append((ins.line, image))
        if len(tokens) >= 3 and tokens[1].upper() == "AS":
            stage_names.add(tokens[2].lower())
    return out


def installed_extras(instructions: list[Instruction]) -> list[tuple[int, str]]:
    """(line, extra) for every `...[a,b]` requirement of a RUN that runs `pip install`."""
    out = []
    for ins in instructions:
        if ins.keyword == "RUN" and "pip install" in ins.value:
            # `".[rollout]"`, `"$(echo x.whl)[rollout]"`; not a shell test `[ -n "$x" ]`
            for group in re.findall(r"[^\s\[]\[([A-Za-z0-9_.,-]+)\]", ins.value):
                out += [(ins.line, e.strip()) for e in group.split(",")]
    return out


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""

    def matches(pattern: str, candidate: str) -> bool:
        regex = ""
        for i, part in enumerate(pattern.split("/")):
            if part == "**":
                regex += "(?:[^/]+/)*" if i < len(pattern.split("/")) - 1 else ".*"
                continue
            piece = fnmatch.translate(part).removeprefix("(?s:").removesuffix(")\\Z")
            regex += piece.replace(".*", "[^/]*") + "/"
        return re.fullmatch(regex.removesuffix("/"), candidate) is not None

    parts = _normal(path).split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = _normal(raw.removeprefix("!").strip().lstrip("/"))
        if any(matches(pattern, c) for c in candidates):
            excluded = not negate
    return excluded


def read_dockerignore(repo: Path = REPO) -> list[str]:
    path = repo / ".dockerignore"
    if not path.exists():
        return []
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def makefile_variable(text: str, name: str) -> str:
    joined = re.sub(r"\\\n", " ", text)
    found = re.search(rf"^{name}\s*[:?]?=(.*)$", joined, re.MULTILINE)
    assert found, f"the Makefile sets no {name}"
    return found.group(1).split("#")[0].strip()


def makefile_images(text: str) -> dict[str, str]:
    """IMAGES := name:path/to/Dockerfile ... -> {name: path}."""
    return dict(entry.split(":", 1) for entry in makefile_variable(text, "IMAGES").split())


# --- checks: each returns the problems it finds -----------------------------------------------
def check_copies(dockerfile: str, text: str, repo: Path = REPO) -> list[str]:
    """(a) every build-context source exists, survives .dockerignore, and is core or own folder."""
    own = str(Path(dockerfile).parent)
    ignore = read_dockerignore(repo)
    problems = []
    for line, source in copy_sources(parse_dockerfile(text)):
        src = _normal(source)
        matches = sorted(repo.glob(src)) if any(c in src for c in "*?[") else [repo / src]
        if not any(m.exists() for m in matches):
            problems.append(f"line {line}: COPY source {source!r} does not exist")
        if dockerignore_excludes(ignore, src):
            problems.append(f"line {line}: COPY source {source!r} is excluded by .dockerignore")
        if src not in CORE and src != own and not src.startswith(own + "/"):
            problems.append(
                f"line {line}: copies {source!r}; an image copies only {sorted(CORE)} "
                f"and its own folder {own}/"
            )
    return problems


def check_entrypoint(dockerfile: str, text: str, repo: Path = REPO) -> list[str]:
    """(b) ENTRYPOINT ["python", "-m", pkg] with pkg/__main__.py in a copied folder."""
    instructions = parse_dockerfile(text)
    final = split_stages(instructions)[-1]
    entries = [ins for ins in final if ins.keyword == "ENTRYPOINT"]
    if not entries:
        return ["the final stage has no ENTRYPOINT"]
    args = entries[-1].exec_form()
    line = entries[-1].line
    if args is None or len(args) != 3 or args[:2] != ["python", "-m"]:
        return [f'line {line}: ENTRYPOINT must be exec form ["python", "-m", "<package>"]']
    package = args[2]
    folders = [repo / _normal(s) for _, s in copy_sources(instructions)]
    if not any(
        (folder / package / "__main__.py").is_file()
        or (folder.name == package and (folder / "__main__.py").is_file())
        for folder in folders
    ):
        return [f"line {line}: no copied folder holds {package}/__main__.py"]
    return []


def check_extras(dockerfile: str, text: str, extras: set[str]) -> list[str]:
    """(c) the installed extras exist in pyproject.toml, among them the deployable's own
    (named like its folder: operator, rollout, trainer, ...)."""
    found = installed_extras(parse_dockerfile(text))
    problems = [
        f"line {line}: extra {extra!r} is not in pyproject.toml's optional-dependencies"
        for line, extra in found
        if extra not in extras
    ]
    own = Path(dockerfile).parent.name
    if own not in {extra for _, extra in found}:
        problems.append(f'installs no ".[{own}]": each image installs its deployable\'s extras')
    return problems


def check_user(text: str) -> list[str]:
    """(d) the final stage runs as a numeric, non-zero UID (and a numeric GID, if given)."""
    final = split_stages(parse_dockerfile(text))[-1]
    users = [ins for ins in final if ins.keyword == "USER"]
    if not users:
        return ["the final stage sets no USER: it would run as root"]
    uid, _, gid = users[-1].value.partition(":")
    if not uid.isdigit() or int(uid) == 0 or (gid and not gid.isdigit()):
        return [f"line {users[-1].line}: USER {users[-1].value!r} is not a numeric non-zero UID"]
    return []


def check_coverage(packages: list[str], dockerfiles: dict[str, str]) -> list[str]:
    """(e) every deployable package is the ENTRYPOINT of a Dockerfile in its own folder."""
    runs: dict[str, set[str]] = {}
    for path, text in dockerfiles.items():
        final = split_stages(parse_dockerfile(text))[-1]
        for ins in final:
            args = ins.exec_form() if ins.keyword == "ENTRYPOINT" else None
            if args and len(args) == 3:
                runs.setdefault(str(Path(path).parent), set()).add(args[2])
    return [
        f"{package}: no image runs it (no Dockerfile in {Path(package).parent}/ on the "
        "Makefile's IMAGES with ENTRYPOINT python -m " + Path(package).name + ")"
        for package in packages
        if Path(package).name not in runs.get(str(Path(package).parent), set())
    ]


def check_bases(text: str) -> list[str]:
    problems = []
    for line, image in base_images(parse_dockerfile(text)):
        tag = image.rsplit("/", 1)[-1].partition(":")[2] if "@" not in image else "digest"
        if not tag or tag == "latest":
            problems.append(f"line {line}: base image {image!r} is not pinned by a tag")
    return problems


def check_port(text: str) -> list[str]:
    final = split_stages(parse_dockerfile(text))[-1]
    ports = {p.split("/")[0] for ins in final if ins.keyword == "EXPOSE" for p in ins.value.split()}
    return [] if PORT in ports else [f"the final stage does not EXPOSE {PORT}"]


# --- the repository's Dockerfiles -------------------------------------------------------------
MAKEFILE = (REPO / "Makefile").read_text()
IMAGES = makefile_images(MAKEFILE)
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
EXTRAS = set(PYPROJECT["project"]["optional-dependencies"])


def deployable_packages(repo: Path = REPO) -> list[str]:
    found = [*repo.glob("operator/rollfleet_*"), *repo.glob("services/*/rollfleet_*")]
    return sorted(str(p.relative_to(repo)) for p in found if p.is_dir())


def test_the_makefile_builds_one_image_per_deployable():
    assert set(IMAGES) == {"operator", "rollout", "rollout-vllm", "trainer", "reward", "env"}
    for name, dockerfile in IMAGES.items():
        assert (REPO / dockerfile).is_file(), f"{name}: {dockerfile} does not exist"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_dockerfile_is_consistent_with_the_layout(name):
    dockerfile = IMAGES[name]
    text = (REPO / dockerfile).read_text()
    problems = [
        *check_copies(dockerfile, text),
        *check_entrypoint(dockerfile, text),
        *check_extras(dockerfile, text, EXTRAS),
        *check_user(text),
        *check_bases(text),
        *check_port(text),
    ]
    assert problems == [], f"{dockerfile}:\n" + "\n".join(problems)


def test_every_deployable_package_has_an_image():
    packages = deployable_packages()
    assert "operator/rollfleet_operator" in packages and len(packages) >= 5, packages
    texts = {path: (REPO / path).read_text() for path in IMAGES.values()}
    assert check_coverage(packages, texts) == []


def test_the_operator_defaults_name_images_make_builds():
    from rollfleet_operator import config

    registry = makefile_variable(MAKEFILE, "REGISTRY")
    tag = makefile_variable(MAKEFILE, "TAG")
    built = {f"{registry}/{name}:{tag}" for name in IMAGES}
    defaults = config.Images().model_dump()
    references = {k: v for k, v in defaults.items() if isinstance(v, str) and "/" in v}
    assert references, defaults
    assert {k: v for k, v in references.items() if v not in built} == {}


# --- the checks can fail ----------------------------------------------------------------------
BAD = """\
# syntax=docker/dockerfile:1
FROM python AS build
COPY no-such-file.txt \\
# a comment inside a continuation

     ./
COPY tests/ tests/
RUN pip install ".[rollout,no-such-extra]"
FROM python:latest
USER root
EXPOSE 9000
ENTRYPOINT python -m rollfleet_rollout
"""


def test_the_parser():
    instructions = parse_dockerfile(BAD)
    assert [i.keyword for i in instructions] == [
        "FROM", "COPY", "COPY", "RUN", "FROM", "USER", "EXPOSE", "ENTRYPOINT",
    ]  # fmt: skip
    assert instructions[1] == Instruction("COPY", "no-such-file.txt ./", 3)
    assert instructions[-1].exec_form() is None
    assert Instruction("CMD", '["python", "-m", "x"]', 1).exec_form() == ["python", "-m", "x"]
    copies = 'COPY --from=build /a /b\nCOPY --chown=1:1 ["x y", "z"]\n\nCOPY a \\\n\n  b c'
    assert copy_sources(parse_dockerfile(copies)) == [(2, "x y"), (4, "a"), (4, "b")]
    assert len(split_stages(instructions)) == 2
    with pytest.raises(ValueError, match="unknown instruction"):
        parse_dockerfile("FROM a:1\nRUN echo \\\nEOF\nBOGUS x")
    with pytest.raises(ValueError, match="heredoc"):
        parse_dockerfile("FROM a:1\nRUN <<EOF\necho hi\nEOF")
    with pytest.raises(ValueError, match="escape character"):
        parse_dockerfile("# escape=`\nFROM a:1")
    with pytest.raises(ValueError, match="continuation"):
        parse_dockerfile("FROM a:1\nRUN echo \\")


def test_checks_catch_a_bad_dockerfile():
    own = "services/rollout/Dockerfile"
    copies = "\n".join(check_copies(own, BAD))
    assert "'no-such-file.txt' does not exist" in copies  # (a)
    assert "'tests/' is excluded by .dockerignore" in copies
    assert "copies 'tests/'" in copies
    assert "exec form" in "\n".join(check_entrypoint(own, BAD))  # (b)
    no_main = BAD.replace(
        "ENTRYPOINT python -m rollfleet_rollout", 'ENTRYPOINT ["python", "-m", "src"]'
    )
    assert "holds src/__main__.py" in "\n".join(check_entrypoint(own, no_main))
    assert check_extras(own, BAD, EXTRAS) == [  # (c)
        "line 8: extra 'no-such-extra' is not in pyproject.toml's optional-dependencies"
    ]
    assert check_extras("services/env/Dockerfile", BAD, EXTRAS) == [
        "line 8: extra 'no-such-extra' is not in pyproject.toml's optional-dependencies",
        'installs no ".[env]": each image installs its deployable\'s extras',
    ]
    assert check_extras(own, "FROM a:1\nRUN pip install .", EXTRAS)
    assert "not a numeric non-zero UID" in check_user(BAD)[0]  # (d)
    assert check_user(BAD.replace("USER root", "USER 0:0"))
    assert check_user(BAD.replace("USER root", "USER 10001:rollfleet"))
    assert check_user(BAD.replace("USER root\n", "")) == [
        "the final stage sets no USER: it would run as root"
    ]
    assert check_user(BAD.replace("USER root", "USER 10001:10001")) == []
    rollout = 'FROM a:1\nENTRYPOINT ["python", "-m", "rollfleet_rollout"]'
    assert check_coverage(  # (e)
        ["services/rollout/rollfleet_rollout", "services/new/rollfleet_new"], {own: rollout}
    ) == [
        "services/new/rollfleet_new: no image runs it (no Dockerfile in services/new/ on the "
        "Makefile's IMAGES with ENTRYPOINT python -m rollfleet_new)"
    ]
    assert len(check_bases(BAD)) == 2
    assert base_images(parse_dockerfile("ARG B=img:1\nFROM ${B} AS b\nFROM b")) == [(2, "img:1")]
    assert check_bases("ARG B\nFROM $B")
    assert check_port(BAD)


def test_dockerignore_rules():
    patterns = ["runs", "**/__pycache__", "*.whl", "docs", "!docs/keep.md"]
    assert dockerignore_excludes(patterns, "runs/x/y.json")
    assert dockerignore_excludes(patterns, "src/rollfleet/__pycache__/a.pyc")
    assert dockerignore_excludes(patterns, "a.whl") and not dockerignore_excludes(
        patterns, "d/a.whl"
    )
    assert dockerignore_excludes(patterns, "docs/x.md")
    assert not dockerignore_excludes(patterns, "docs/keep.md")
    assert not dockerignore_excludes(patterns, "src/rollfleet/spec.py")
