"""Every flag at its boundaries and beyond, through engine.main's own parsing: a clear error or a
valid Config, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.config import FIELDS, Check, Config, ConfigError, validate
from tests.helpers import REPO, config_flags, run_engine, tiny_config

# Runs in a fresh process: absl's FLAGS are global, and engine.main defines them on import.
_DRIVER = r"""
import json, sys
from absl import flags
from engine import flags as engine_flags, main
from engine.config import ConfigError

FLAGS = flags.FLAGS
out = []
for name, value in json.loads(sys.stdin.read()):
    FLAGS.unparse_flags()
    try:
        main.parse_flags(["engine.main", f"--{name}={value}"])
        engine_flags.config_from_flags(FLAGS)
        out.append([name, value, "ok", ""])
    except SystemExit as e:
        out.append([name, value, f"exit {e.code}", ""])
    except ConfigError as e:
        out.append([name, value, "refused", str(e)])
    except BaseException as e:  # the failure this test looks for
        out.append([name, value, "traceback", f"{type(e).__name__}: {e}"])
print("RESULTS " + json.dumps(out))
"""


def _values(default, rng) -> list[str]:
    """Boundary values of the field's type, then random ones of every magnitude and sign."""
    if isinstance(default, bool):
        return ["true", "false", "1", "0", "maybe", ""]
    if isinstance(default, int):
        fixed = [-(2**63), -1, 0, 1, 2, 3, 2**31, 10**18, 10**40, "1.5", "abc", "nan", ""]
        return fixed + [str(int(rng.choice([-1, 1]) * 10 ** rng.uniform(0, 12))) for _ in range(4)]
    if isinstance(default, float):
        fixed = ["nan", "inf", "-inf", -1.0, -1e-12, 0.0, 1e-300, 0.5, 1.0, 1.5, 1e308, "abc", ""]
        return fixed + [repr(float(rng.choice([-1, 1]) * 10 ** rng.uniform(-12, 12))) for _ in range(4)]
    return ["", "x", "../..", "auto", "none", "a" * 5000, "TCGA_CS_4941_19960909"]


def test_every_flag_value_is_refused_clearly_or_accepted():
    import numpy as np

    rng = np.random.default_rng(0)
    cases = [[name, str(v)] for name, field in FIELDS.items() for v in _values(field.default, rng)]
    proc = subprocess.run([sys.executable, "-c", _DRIVER], cwd=REPO, input=json.dumps(cases),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULTS ", 1)[1])
    assert len(results) == len(cases) > 600
    tracebacks = [r for r in results if r[2] == "traceback"]
    assert not tracebacks, tracebacks[:10]
    # A refusal names a flag; an absl parse error exits 2 with its own one line.
    for name, value, outcome, message in results:
        assert outcome in ("ok", "refused", "exit 2"), (name, value, outcome)
        if outcome == "refused":
            assert message.startswith("--"), (name, value, message)
    # Non-finite numbers never get through.
    for name, value, outcome, _ in results:
        if value in ("nan", "inf", "-inf") and isinstance(FIELDS[name].default, float):
            assert outcome != "ok", (name, value)
    assert "--image_size: must be a positive integer up to 512" in " ".join(
        m for n, v, o, m in results if n == "image_size" and v == str(2**31))
    assert Config().image_size == 256


def test_every_number_has_a_range_and_every_check_refuses_what_it_says():
    """Each field's own check, at its edges: the values just outside are refused by validate(),
    naming that flag; the edges themselves pass the check. Removing a check fails this test."""
    numbers = [n for n, f in FIELDS.items() if type(f.default) in (int, float)]
    assert numbers and all(isinstance(FIELDS[n].metadata["check"], Check) for n in numbers), [
        n for n in numbers if not FIELDS[n].metadata["check"]]
    checked = 0
    for name, field in FIELDS.items():
        check = field.metadata["check"]
        if check is None:
            continue
        assert check.inside and check.outside, name
        for value in check.inside:
            assert check(value) is None, (name, value)
        for value in check.outside:
            with pytest.raises(ConfigError) as refused:
                validate(Config(**{name: value}))
            assert refused.value.flag == name and check.wording in str(refused.value), (name, value)
            checked += 1
    assert checked >= 60


def test_extreme_values_that_pass_validation_end_in_a_clear_error(tmp_path):
    # A batch larger than the data: the run says so in one line instead of failing deep inside.
    proc = run_engine(config_flags(tiny_config(tmp_path / "run", batch_size=4096, epochs=1)), timeout=180)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "fewer than one global batch" in proc.stderr
