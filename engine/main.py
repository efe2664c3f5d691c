"""Entry point: `python -m engine.main --flagfile=flags/unet.cfg` (absl flags -> Config -> mode)."""

from __future__ import annotations

import logging
import os
import re
import sys

# Quiet TensorFlow's C++ start-up chatter; must be set before TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging as absl_logging  # noqa: E402

from engine import flags as engine_flags  # noqa: E402
from engine.config import ConfigError  # noqa: E402

engine_flags.define_flags()
FLAGS = flags.FLAGS


def setup_logging() -> None:
    """The engine's own lines go to stdout as they are; warnings say so."""

    class Plain(logging.Formatter):
        def format(self, record):
            text = super().format(record)
            return text if record.levelno < logging.WARNING else f"warning: {text}"

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(Plain("%(message)s"))
    for name in ("engine", "data", "models"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False


def fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


HELP = {"--help": False, "-help": False, "-h": False, "-?": False, "--helpshort": False, "--helpfull": True}


def parse_flags(argv: list[str], flag_values: flags.FlagValues = FLAGS) -> list[str]:
    """absl parsing with the project's one-line error and exit code 2 for a bad flag; help
    (asked for, so not an error) exits 0."""
    asked = [HELP[a] for a in argv[1:] if a in HELP]
    if asked:
        print(flag_values.get_help() if any(asked) else flag_values.module_help(engine_flags.__name__))
        sys.exit(0)
    try:
        return flag_values(argv)
    except flags.Error as e:
        fail(str(e), 2)
    except UnicodeDecodeError as e:
        files = [a.split("=", 1)[1] for a in argv if a.startswith(("--flagfile=", "-flagfile="))]
        fail(f"a --flagfile ({', '.join(files) or 'given'}) is not valid UTF-8 text: byte "
             f"{e.object[e.start:e.start + 1]!r} at position {e.start}; save it as UTF-8", 2)


def _lost_peer(message: str) -> str:
    """The task TensorFlow's error names as gone (its heartbeat ended, or it refused a call)."""
    found = re.search(r"/job:(chief|worker)/replica:\d+/task:(\d+)", message)
    return f"TF_CONFIG's {found.group(1)} task {found.group(2)}" if found else "a worker"


def run(config) -> int:
    """Resolves the device policy once, then dispatches on --mode; returns the exit code."""
    # Imported here so that --help and flag errors answer without loading TensorFlow.
    import tensorflow as tf

    from data.lgg import DataError
    from engine import runtime as runtime_lib
    from engine.checkpoint import CheckpointError
    from engine.cluster import ClusterError, ClusterUnavailable
    from engine.rundir import RunDirError
    from engine.trainer import NonFiniteLossError

    try:
        rt = runtime_lib.resolve(config)
    except ClusterUnavailable as e:
        fail(str(e), 1)
    except runtime_lib.TfConfigError as e:
        fail(str(e), 2)
    logging.getLogger("engine").info(f"brainseg {config.mode}: {rt.describe()}")
    if not rt.is_chief:  # the chief speaks for the cluster; a worker only reports its errors
        for name in ("engine", "data", "models"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        if config.mode == "train":
            from engine import train
            stop = train.run(config, rt).stop
            if stop.interrupted:  # the run saved a checkpoint and resumes with the same command
                print(f"error: interrupted by {stop.value} before the last step; the checkpoint is "
                      f"saved: run the same command to resume (exit code {stop.exit_code})",
                      file=sys.stderr, flush=True)
            return stop.exit_code
        elif config.mode == "evaluate":
            from engine import evaluate
            evaluate.run(config, rt)
        elif config.mode == "predict":
            from engine import predict, predict_nifti
            return (predict_nifti if predict_nifti.wants(config.input) else predict).run(config, rt)
        elif config.mode == "export":
            from engine import export
            export.run(config, rt)
        elif config.mode == "benchmark":
            from engine import benchmark
            benchmark.run(config, rt)
    except (DataError, RunDirError, ClusterError, ConfigError) as e:
        fail(str(e), 2)
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
            tf.errors.CancelledError) as e:
        if rt.num_workers == 1:
            raise
        _exit_lost_cluster(rt.worker_index, e)
    except (CheckpointError, NonFiniteLossError) as e:
        fail(str(e), 1)
    except OSError as e:  # A full or read-only disk outside the checkpoint manager.
        fail(f"cannot write {e.filename or 'the run directory'}: {e.strerror or e}", 1)
    return 0


def _exit_lost_cluster(worker_index: int, e: Exception) -> None:
    print(f"error: worker {worker_index} lost the cluster: {_lost_peer(e.message)} stopped or "
          f"cannot be reached ({type(e).__name__}). Start every worker again with the same "
          "command: the run resumes from its last checkpoint", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Not sys.exit: the interpreter's shutdown tears down the collective runtime, which can wait
    # on the worker that is gone (over a minute on a loaded machine). Checkpoints are already
    # whole on disk; summaries the resumed run writes again are all that is skipped.
    os._exit(1)


def main(argv: list[str], flag_values: flags.FlagValues = FLAGS) -> None:
    """The parsed command line's config, run; exits with the run's code."""
    # TensorFlow and Keras log routine INFO lines through absl; the engine prints its own.
    absl_logging.set_verbosity(absl_logging.WARNING)
    setup_logging()
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}: every setting is a --flag (see --helpfull)", 2)
    try:
        config = engine_flags.config_from_flags(flag_values)
    except ConfigError as e:
        fail(str(e), 2)
    sys.exit(run(config))


def invoke(args: list[str]) -> int:
    """`python -m engine.main ARGS` inside this process (for tests): the same parsing, messages
    and exit code, on flags of their own, without a new process's TensorFlow start-up."""
    flag_values = flags.FlagValues()
    engine_flags.define_flags(flag_values)
    try:
        main(parse_flags(["engine.main", *args], flag_values), flag_values)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    # A path that is not valid UTF-8 is printed with escapes rather than failing the print.
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(errors="backslashreplace")
    app.run(main, flags_parser=parse_flags)
