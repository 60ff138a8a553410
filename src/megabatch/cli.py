"""The ``megabatch`` command: parse, then call the chosen command's ``run``.

Each command is a module with ``configure_parser(parser)`` and ``run(args) -> int``
(:data:`COMMANDS`); ``train`` and ``recipes`` are a few lines and live here. The
modules import torch inside ``run``, so that ``megabatch --help`` starts without it.

Bad input ends with one line ``megabatch: error: ...`` and exit status 2 (1 for a
diverged run); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from megabatch import __version__, eval_command, flags, noise_command, schedule_command
from megabatch.bench import command as bench_command
from megabatch.errors import UserError
from megabatch.simulate import command as simulate_command
from megabatch.study import command as study_command

COMMANDS = (  # name, the module with configure_parser and run, help
    ("eval", eval_command, "evaluate a checkpoint: test top-1 and top-5"),
    ("schedule", schedule_command, "print a recipe's learning rate and alpha_sgd as CSV"),
    ("study", study_command, "accuracy against batch size: a grid of methods x batches x seeds"),
    ("noise-scale", noise_command, "measure the gradient noise scale (the critical batch) of a recipe's model"),
    ("simulate", simulate_command, "predict time and scaling efficiency on a cluster"),
    ("bench", bench_command,
     "measure training (and input-pipeline) images/s here: ResNet-50, or the study model with --model small-cnn"),
)


def cmd_train(args: argparse.Namespace) -> int:
    from megabatch.build import train

    train(args.recipe, args.set, args.resume, args.out, args.data)
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from megabatch import recipe as recipes

    names = recipes.builtin_names()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {recipes.describe(name)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megabatch", description="Extremely large minibatch training (Akiba et al. 2017).")
    parser.add_argument("--version", action="version", version=f"megabatch {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model with a recipe (also under torchrun, srun, mpirun)")
    flags.add_recipe(p, required=False)  # --resume reads the run's own
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a run from its newest complete checkpoint, mid-epoch included")
    p.add_argument("--data", help="folder with the data set (default: the recipe's, e.g. "
                                   "/usr/share/datasets/fashion-mnist)")
    p.add_argument("--out", help="run directory (default: runs/<recipe>-<date>-<time>)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("recipes", help="list the built-in recipes")
    p.set_defaults(func=cmd_recipes)

    for name, module, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text)
        module.configure_parser(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        if args.debug:
            raise
        _print_error(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        print("megabatch: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, BrokenPipeError) and not args.debug and _stdout_gone():
            # The reader left (`megabatch schedule ... | head`): no traceback, and the status
            # of a writer that lost its pipe (128 + SIGPIPE), since the command did not finish.
            from megabatch.progress import discard_stdout

            discard_stdout()
            return 141
        # Under several processes a crash is one line naming the rank (torchrun then
        # stops the others); alone, the traceback is the most useful report.
        if args.debug or not _rank_prefix():
            raise
        _print_error(f"{type(e).__name__}: {e} (rerun with --debug for the traceback)")
        return 1


def _stdout_gone() -> bool:
    """Whether stdout is a pipe or socket whose reader has left (poll reports an error or a
    hang-up on it; a terminal, a file or /dev/null reports neither)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
    except (AttributeError, OSError, ValueError):  # no poll() (Windows), no file behind stdout
        return False
    return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))


def _rank_prefix() -> str:
    from megabatch.distributed import launch_environment

    try:
        info, _ = launch_environment()
    except UserError:
        return ""
    return f"rank {info.rank}/{info.world_size}: " if info.distributed else ""


def _print_error(message: str) -> None:
    first_line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    # One write, so that lines of several ranks sharing a terminal do not interleave.
    sys.stderr.write(f"megabatch: error: {_rank_prefix()}{first_line}\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
