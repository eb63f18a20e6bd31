"""What every command line of the project shares: seeds, flag checks, --help, and run_cli.

run_cli runs a stage's main: a user error is one line and exit status 2, never a traceback; a stop by a
signal is Stopped. The check_* functions give one clear error per bad flag before anything runs;
flags_for gives back the flags of a run's recorded args (the advice to resume or re-save a run).
"""

import argparse
import hashlib
import math
import os
import random
import sys

import torch

from plumbing import files


def set_seed(seed):
    """Seed every RNG the stages use (python, torch CPU and CUDA)."""
    random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def derive_seed(seed, purpose):
    """The seed of one RNG of a run: a hash of the run's --seed and the RNG's purpose ("query
    stream de", "fresh phi", ...). Different purposes and different --seed values never share
    a seed (offsets like seed + 1 collide with the next run's seed)."""
    digest = hashlib.sha256(f"{seed}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1  # 31 bits: safe for every torch and BatchStream use


# ------------------------------------------------------------------ values and flags

def few(names, shown=3):
    """A list of names for a one-line error: the first `shown`, then how many more (a model's tensor
    names run to kilobytes)."""
    names = list(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(map(str, names[:shown])) + more


def check_finite(value, what, fix):
    """Stop before an optimizer step (or a save) that a NaN or infinite loss would poison."""
    if not math.isfinite(value):
        raise ValueError(f"{what} is {value}: {fix}; nothing from this step was saved")


def check_at_least(args, minimum, *flags):
    """Every named integer flag is at least `minimum`; the error names the flag."""
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value < minimum:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least {minimum} (got {value})")


SEED_LIMIT = 2**32  # what every RNG takes (numpy's and the data streams' included); no run needs more


def check_seed(args):
    """--seed within what every RNG accepts (10**20 would fail deep inside torch, after --out is claimed)."""
    if not 0 <= args.seed < SEED_LIMIT:
        raise ValueError(f"--seed must be between 0 and {SEED_LIMIT - 1} (got {args.seed})")


def check_positive(args, *flags):
    """Every named float flag is a positive finite number (NaN fails too)."""
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and not (0 < value < math.inf):
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive number (got {value})")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's real default: argparse's "(default: X)", except where the help text
    already says the default (one computed from other flags) or there is none to say (a switch)."""

    def _get_help_string(self, action):
        said = any(text in (action.help or "") for text in ("(default", "; default"))
        if said or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parser_taking_negative_numbers(parser):
    """Let `--outer-lr -1e-5` reach the range check (argparse's own matcher misses exponents and
    would say "expected one argument")."""
    import re
    parser._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
    return parser


def flags_for(parser, values, check, leave_out=()):
    """The command-line flags that give a run's recorded args (`values`) back through `parser` and its
    stage's `check` (which fills in some values itself): every value that is not the parser's default,
    but those that `check` fills in alone (given beside others, some of them would be refused)."""
    import warnings
    parser.exit_on_error = False  # a value it refuses (a record of older code) raises, not exits
    given = {}
    for action in parser._actions:
        if action.option_strings and action.dest in values and action.dest not in leave_out \
                and values[action.dest] != action.default and flag_of(action, values[action.dest]):
            given[action.dest] = flag_of(action, values[action.dest])
    left_out = True
    while left_out:  # again after each pass: leaving one out may let check accept leaving out another
        left_out = False
        for dest in list(given):
            args = parser.parse_args([word for other, flag in given.items() if other != dest for word in flag])
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    check(args)
            except ValueError:
                continue
            if getattr(args, dest) == values[dest]:
                del given[dest]
                left_out = True
    return [word for flag in given.values() for word in flag]


def flag_of(action, value):
    """The words that give an argparse action `value` (not its default), or None where none can (None)."""
    import argparse
    long = [option for option in action.option_strings if option.startswith("--")] or action.option_strings
    if isinstance(action, argparse.BooleanOptionalAction):
        return [long[0] if value else long[1]]
    if action.nargs == 0:  # store_true, store_false, store_const: given, since the value is not the default
        return [long[0]]
    return None if value is None else [long[0], str(value)]


# ------------------------------------------------------------------ running a command line

def user_error_message(e):
    """One line for an error a user can fix, or None for a bug (which keeps its traceback)."""
    from safetensors import SafetensorError
    failed_write = files.write_failure(e, getattr(e, "filename", None) or "a file (its name was not said)")
    if failed_write:  # before the damaged-file advice below: a full disk is no corrupt file
        return failed_write
    if isinstance(e, SafetensorError):
        return (f"a .safetensors file is truncated or corrupt ({e}): restore it, or re-run the stage that wrote "
                f"it into a new --out (a damaged default model: delete its cache folder, it is converted again)")
    if isinstance(e, PermissionError):
        return f"{e.strerror}: {e.filename}: choose a folder you can write (--out) or fix its permissions"
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.filename:
        return f"{e.strerror}: {e.filename}"
    if isinstance(e, (ValueError, FileNotFoundError, ImportError)):
        return str(e)
    return None


class Stopped(KeyboardInterrupt):
    """A stop by a signal (SIGTERM, SIGHUP, or SIGINT passed on), said by run_cli as a Ctrl-C is
    ("interrupted: ..."), with the shell's exit status for that signal (128 + its number)."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.status = 128 + signum


def run_cli(main, argv=None, interrupted="the last complete checkpoint is kept"):
    """Run a stage's main(argv) (None: the command line); a user error (bad flag, missing folder,
    unknown language, unreadable file, ...) is one line on stderr and exit status 2, never a
    traceback (PRIMING_DEBUG=1 shows it). `interrupted` is what Ctrl-C leaves, in the stage's words,
    unless the stage re-raised the KeyboardInterrupt with its own words (what it knows was left)."""
    try:
        main(argv)
    except KeyboardInterrupt as e:
        print(f"interrupted: {str(e) or interrupted}", file=sys.stderr)
        raise SystemExit(getattr(e, "status", 130))
    except Exception as e:
        message = user_error_message(e)
        if message is None or os.environ.get("PRIMING_DEBUG"):
            raise  # a bug, or the full traceback for developers
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


THREADS_HELP = "torch's intra-op CPU threads (default: the cores this process may use, os.sched_getaffinity)"


def set_threads(args):
    """torch's intra-op threads: --threads, else the cores this process may use (its affinity, which
    taskset and container CPU sets narrow; torch's own default counts the machine's cores). Writes
    the count used into args.threads, so run.json records it, and says it (the run's log)."""
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads} (leave it out for the cores this "
                         f"process may use)")
    given = args.threads is not None
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    args.threads = args.threads if given else len(affinity)
    torch.set_num_threads(args.threads)
    print(f"torch threads: {args.threads} ({'--threads' if given else 'the cores this process may use'})",
          flush=True)
    return args.threads
