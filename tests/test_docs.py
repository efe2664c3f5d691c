"""The docs name only what the code has: BUILD.md's modules and names, README.md's size and test command."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "data", "models", "tests")
# A quoted `name.ext` is a file the engine writes or reads (config.json, split.json), not an attribute.
FILE_SUFFIXES = {"json", "jsonl", "md", "csv", "keras", "png", "cfg", "tif", "tiff", "toml", "py", "txt",
                 "nii", "gz", "onnx"}
# BUILD.md's sections that describe the code itself; elsewhere CamelCase names are also
# TensorFlow's, oneDNN's and Keras' (Conv2DBackpropFilter, LossScaleOptimizer).
DESIGN_SECTIONS = ("## Layout", "## Design notes")
MAX_README_LINES = 200


def _names(tree: ast.AST) -> dict[str, set[str]]:
    """Top-level names of a module ("" key), and each class's members (methods, fields, self.x)."""
    found: dict[str, set[str]] = {"": set()}

    def targets(node) -> list[str]:
        if isinstance(node, ast.Assign):
            return [t.id for t in node.targets if isinstance(t, ast.Name)]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            return [node.target.id]
        return []

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found[""].add(node.name)
        found[""].update(targets(node))
        if isinstance(node, ast.ClassDef):
            members = found.setdefault(node.name, set())
            for item in node.body:
                members.update(targets(item))
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    members.add(item.name)
                    for sub in ast.walk(item):  # self.x = ... in any method
                        for t in getattr(sub, "targets", [getattr(sub, "target", None)]):
                            if (isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                                    and t.value.id == "self"):
                                members.add(t.attr)
    return found


@pytest.fixture(scope="module")
def code() -> dict[str, dict[str, set[str]]]:
    """{"engine/checkpoint.py": {"": top-level names, "CheckpointManager": its members, ...}}."""
    return {str(p.relative_to(ROOT)): _names(ast.parse(p.read_text()))
            for package in PACKAGES for p in (ROOT / package).glob("*.py")}


def _quoted(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


def _sections(text: str, headings: tuple[str, ...]) -> str:
    """The text under the given level-2 headings, each up to the next level-2 heading."""
    parts = re.split(r"(?m)^(?=## )", text)
    return "".join(p for p in parts if p.startswith(headings))


def _module_file(parts: list[str], code) -> tuple[str, list[str]] | None:
    """The longest prefix of `parts` that is a module file of the project, and the rest."""
    for n in range(len(parts), 0, -1):
        path = "/".join(parts[:n]) + ".py"
        if path in code:
            return path, parts[n:]
    return None


def _missing(reference: str, code, *, design: bool) -> str | None:
    """What of a quoted reference does not exist in the code, or None if it does (or is no name)."""
    ref = reference.strip().removesuffix("()")
    if re.fullmatch(r"[\w/]+\.py", ref):  # a module path: engine/train.py, or predict.py in a list of them
        known = ref in code or (ROOT / ref).exists() or ("/" not in ref and any(
            (ROOT / package / ref).exists() for package in PACKAGES))
        return None if known else f"no file {ref}"
    if ref in PACKAGES:
        return None
    if not re.fullmatch(r"[A-Za-z_][\w/]*(\.[A-Za-z_]\w*)*", ref):
        return None  # a command, a flag, a formula: not a name
    if "/" in ref and ref.split("/")[0] not in PACKAGES:
        return None  # a TensorBoard tag (train/loss), a folder
    parts = re.split(r"[./]", ref)
    if parts[-1] in FILE_SUFFIXES and len(parts) == 2:
        return None
    packaged = parts[0] in PACKAGES
    short = [f"{p}/{parts[0]}.py" for p in PACKAGES if f"{p}/{parts[0]}.py" in code] if len(parts) > 1 else []
    if packaged:
        located = _module_file(parts, code)
        if located is None:
            return f"no module for {ref}"
        module, rest = located
    elif short:  # policies.BestMetric: a module of engine/, data/ or models/ by its own name
        module, rest = short[0], parts[1:]
    elif design and re.fullmatch(r"[A-Z]\w*", parts[0]) and not parts[0].isupper():  # LoopState, Cluster.together
        owners = [m for m, names in code.items() if parts[0] in names[""] and parts[0] in names]
        if not owners:
            return f"no class {parts[0]} in {', '.join(PACKAGES)}"
        module, rest = owners[0], parts
    else:
        return None
    names = code[module]
    if not rest:
        return None
    if rest[0] not in names[""]:
        return f"{module} defines no {rest[0]}"
    if len(rest) > 1 and rest[0] in names and rest[1] not in names[rest[0]]:
        return f"{module}: {rest[0]} has no {rest[1]}"
    return None


def test_build_md_names_only_modules_and_names_that_exist(code):
    text = (ROOT / "BUILD.md").read_text()
    design = _sections(text, DESIGN_SECTIONS)
    assert "## Layout" in design and "## Design notes" in design, "BUILD.md lost a section this test reads"
    problems = sorted({f"`{q}`: {m}" for q in _quoted(text)
                       if (m := _missing(q, code, design=False))}
                      | {f"`{q}`: {m}" for q in _quoted(design) if (m := _missing(q, code, design=True))})
    assert not problems, "BUILD.md quotes what the code does not have:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", ["README.md", "docs/quality.md"])
def test_the_user_docs_name_only_files_and_modules_that_exist(code, doc):
    problems = sorted({f"`{q}`: {m}" for q in _quoted((ROOT / doc).read_text())
                       if (m := _missing(q, code, design=False))})
    assert not problems, f"{doc} quotes what the code does not have:\n" + "\n".join(problems)


@pytest.mark.parametrize("reference, problem", [
    ("engine/nowhere.py", "no file"),
    ("LoopState", "no class LoopState"),
    ("policies.BestMetric", "defines no BestMetric"),
    ("monitor.BestMetric.nothing", "BestMetric has no nothing"),
    ("engine.checkpoint.gone", "defines no gone"),
])
def test_the_check_finds_names_that_are_gone(code, reference, problem):
    assert problem in (_missing(reference, code, design=True) or "")


@pytest.mark.parametrize("reference", [
    "monitor.BestMetric", "engine/monitor.py", "Cluster.together", "engine.runtime.resolve_precision",
    "config.json", "tests/helpers.run_engine", "--overwrite", "divmod(step, steps_per_epoch)"])
def test_the_check_accepts_what_exists(code, reference):
    assert _missing(reference, code, design=True) is None


# A flag that counts time or progress, by its name, and the units its help must name.
DURATION = re.compile(r"epochs|every|steps|patience|cooldown|timeout|warmup")
UNITS = re.compile(r"\b(epochs?|steps?|evaluations?|seconds?)\b")


def test_every_duration_flag_names_its_unit():
    from engine.config import FIELDS, help_text

    durations = [name for name, field in FIELDS.items() if DURATION.search(name) and field.type in ("int", "float")]
    assert {"epochs", "log_every", "eval_every", "overlay_every", "warmup_epochs", "checkpoint_every_steps",
            "plateau_patience", "early_stopping_patience", "collective_timeout"} <= set(durations)
    unnamed = [name for name in durations if not UNITS.search(help_text(name))]
    assert not unnamed, f"these flags' help does not say in what unit they count: {unnamed}"
    # The units that differ are stated where a reader would confuse them.
    assert "steps" in help_text("log_every") and "epochs" in help_text("eval_every")
    assert "epochs" in help_text("overlay_every") and "--eval_every" in help_text("early_stopping_patience")


def _ci_test_command() -> str:
    lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert len(lines) == 1, lines
    return lines[0].strip()


def test_readme_is_a_short_guide_whose_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= MAX_README_LINES
    commands = [line.strip() for line in readme.splitlines()]
    assert _ci_test_command() in commands, (
        f"README.md's test command must be .ci/run's, as a line of its own: {_ci_test_command()}")


def test_readme_lists_the_exit_codes_the_engine_ends_with():
    from engine.controller import StopReason

    section = _sections((ROOT / "README.md").read_text(), ("## Exit codes",))
    listed = {int(code) for row in re.findall(r"(?m)^\| ([\d, ]+) \|", section) for code in row.split(",")}
    # 0 done, 1 failed while running, 2 bad input (engine.main.fail), and each signal's code.
    assert listed == {0, 1, 2} | {reason.exit_code for reason in StopReason}
