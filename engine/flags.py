"""The absl flags of `python -m engine.main`: one per Config field, with its default and help."""

from __future__ import annotations

from absl import flags

from engine.config import FIELDS, Config, help_text, validate


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines one flag per Config field; Config holds every default and help text."""
    for name, field in FIELDS.items():
        default, text = field.default, help_text(name)
        # Ranges and choices are checked in validate(), so a bad value gets the project's error line.
        if isinstance(default, bool):
            flags.DEFINE_boolean(name, default, text, flag_values=flag_values)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, text, flag_values=flag_values)
        elif isinstance(default, float):
            flags.DEFINE_float(name, default, text, flag_values=flag_values)
        else:
            flags.DEFINE_string(name, default, text, flag_values=flag_values)


def config_from_flags(flag_values: flags.FlagValues) -> Config:
    """Builds and validates the Config. Raises ConfigError naming the flag."""
    return validate(Config(**{name: flag_values[name].value for name in FIELDS}))
