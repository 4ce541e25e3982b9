"""The ``robustse`` click group: global options, the mapping of errors to one line and an exit
code, the per-invocation context, and the options several commands share."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import click

from robustse.core.errors import RobustseError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _fail(message: str, code: int) -> NoReturn:
    first = " ".join(str(message).split())  # one line, whatever the message held
    click.echo(f"error: {first}", err=True)
    sys.exit(code)


class RobustseGroup(click.Group):
    """A click group that maps errors to one stderr line and an exit code."""

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not sys.warnoptions:  # library warnings would add lines to one-line errors; -W shows them
            warnings.simplefilter("ignore")
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            _fail("aborted", 1)
        except click.ClickException as exc:
            message = exc.format_message()
            if isinstance(exc, click.UsageError) and exc.ctx is not None:
                message = f"{message} (see '{exc.ctx.command_path} --help')"
            _fail(message, exc.exit_code)
        except RobustseError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted (finished work is saved; rerun the same command to resume)", 130)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; Ctrl-C is caught here, before click turns it into a blank line and
        "aborted" with exit 1."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            _fail("interrupted (finished work is saved; rerun the same command to resume)", 130)


class Ctx:
    """Global options shared by every command."""

    def __init__(self, device: str, quiet: bool) -> None:
        self.device_name, self.quiet = device, quiet
        self.verbose = False

    @property
    def device(self):
        from robustse.core.device import resolve_device

        return resolve_device(self.device_name)

    def distributed(self):
        """(layout, device) of this process: joins the process group when launched by torchrun."""
        from robustse.core.distributed import init_from_env, shutdown

        layout, device = init_from_env(self.device)
        if layout.active:
            click.get_current_context().call_on_close(shutdown)
            if not layout.is_main:
                from robustse.core.progress import progress_settings

                self.quiet = True  # one voice: rank 0 prints progress and results
                click.get_current_context().with_resource(progress_settings(show=False))
        return layout, device

    def log(self, message: str) -> None:
        if not self.quiet:
            click.echo(message, err=True)

    @property
    def debug(self):
        """A logger for --verbose detail, or None."""
        return self.log if self.verbose and not self.quiet else None


pass_ctx = click.make_pass_decorator(Ctx)


@click.group(cls=RobustseGroup, context_settings=CONTEXT)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Where to run: auto (CUDA when present), cpu, cuda or cuda:N.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or log lines; results only.")
@click.option("--verbose", "-v", is_flag=True, help="More log lines (per cell: accuracy and time).")
@click.option(
    "--plugin",
    "plugins",
    multiple=True,
    metavar="MODULE_OR_FILE",
    help="Import a module (or a .py file) that registers attacks before the command runs; repeatable. "
    "Installed packages with a 'robustse.attacks' entry point load without it.",
)
@click.version_option(package_name="robustse")
@click.pass_context
def cli(ctx: click.Context, device: str, quiet: bool, verbose: bool, plugins: tuple[str, ...]) -> None:
    """robustse: does Squeeze-and-Excitation gating damp adversarial perturbations?

    Every command that draws random numbers takes its own --seed; every command takes --json
    (one envelope: {"command", "version", "result"}, strict JSON with null for NaN).

    Shell completion (bash): eval "$(_ROBUSTSE_COMPLETE=bash_source robustse)"; zsh and fish:
    zsh_source, fish_source.
    """
    import re

    from robustse.core.errors import DeviceError

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):  # availability is checked when a command needs it
        raise DeviceError(f"unknown device {device!r} (valid: auto, cpu, cuda, cuda:N)")
    ctx.obj = Ctx(device, quiet)
    ctx.obj.verbose = verbose and not quiet
    from robustse.core.progress import progress_settings

    # bars on a terminal, else a log line at most every 30 s; nothing with --quiet
    ctx.with_resource(progress_settings(show=not quiet, log=ctx.obj.log))
    if plugins:
        from robustse.attacks import load_plugin

        for plugin in plugins:
            load_plugin(plugin)


# --------------------------------------------------------------------------- shared options

SEED_RANGE = click.IntRange(0, 2**31 - 1)


def seed_option(help: str, default: int | None = 0) -> Any:
    """--seed with a command-specific help line (what the seed drives); shown default."""
    return click.option("--seed", type=SEED_RANGE, default=default, show_default=default is not None, help=help)


def json_option(fn: Any) -> Any:
    """--json: print the result as one strict-JSON envelope instead of text."""
    return click.option(
        "--json", "as_json", is_flag=True, help='Print the result as JSON: {"command", "version", "result"}.'
    )(fn)


def emit_json(result: Any) -> None:
    """Print ``result`` in the one envelope every command's --json uses; strict JSON (NaN is null)."""
    from robustse._version import __version__
    from robustse.core.jsonout import dumps

    command = click.get_current_context().info_name
    click.echo(dumps({"command": command, "version": __version__, "result": result}))


class DatasetName(click.ParamType):
    """A registered dataset name or ``imagefolder:<DIR>``."""

    name = "dataset"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        from robustse.data.datasets import list_datasets

        text = str(value)
        if text in list_datasets() or (text.startswith("imagefolder:") and len(text) > len("imagefolder:")):
            return text
        self.fail(f"{text!r} is not one of {', '.join(list_datasets())} or imagefolder:DIR", param, ctx)


def dataset_option(fn: Any) -> Any:
    """--dataset NAME|imagefolder:DIR."""
    return click.option(
        "--dataset",
        type=DatasetName(),
        default=None,
        help="Dataset: a registered name or imagefolder:DIR [default: the checkpoint's, else fashion-mnist].",
    )(fn)


def data_options(fn: Any) -> Any:
    """--dataset, --data-root, --download, --eval-subset."""
    fn = click.option(
        "--eval-subset",
        type=click.IntRange(min=1),
        default=None,
        help="Evaluate on this many test images (a seeded subset) [default: all].",
    )(fn)
    fn = click.option("--download", is_flag=True, help="Let torchvision download missing files.")(fn)
    fn = data_root_option(fn)
    return dataset_option(fn)


def data_root_option(fn: Any) -> Any:
    """--data-root DIR."""
    return click.option(
        "--data-root",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Folder with the dataset files [default: $ROBUSTSE_DATA, then system locations].",
    )(fn)


def num_classes_option(help: str, default: int | None = 10) -> Any:
    """--num-classes with a command-specific help line."""
    return click.option(
        "--num-classes", type=click.IntRange(min=1), default=default, show_default=default is not None, help=help
    )
