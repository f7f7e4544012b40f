"""The ``della`` command line: parse arguments, call the API, map errors to exit codes.

Results go to stdout (human text, or one JSON object with ``--json``); progress, warnings and
errors go to stderr. User mistakes are one line and exit 2; merge and IO failures exit 1; an
interrupt exits 130. Set DELLA_DEBUG=1 to see tracebacks. Torch is imported inside commands so
that ``--help`` is instant.
"""

import contextlib
import gc
import json
import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
import typer.core

from della_cli import __version__
from della_cli.errors import DellaError
from della_cli.sizes import human_size, parse_size

EXIT_INTERRUPTED = 130


class _Command(typer.core.TyperCommand):
    """Usage lines as people write them (``della merge [OPTIONS] RECIPE OUT``): typer wraps
    required arguments in braces, which read like template placeholders."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [piece.strip("{}") for piece in super().collect_usage_pieces(ctx)]


class _MergeCommand(_Command):
    """``--ray`` may come without its address (``cli_parts.with_ray_address``)."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        from della_cli.cli_parts import with_ray_address

        return super().parse_args(ctx, with_ray_address(args))


app = typer.Typer(
    name="della",
    help="Merge fine-tuned language models without training (DELLA-Merging and baselines).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextmanager
def reported_errors(hint: str | None = None):
    """Turn known errors into one line and an exit code; SIGINT and SIGTERM raise
    KeyboardInterrupt once, and later signals are ignored so that the clean-up completes
    (``io.interrupts``). ``hint`` is added to merge and IO failures (exit 1)."""
    from della_cli.io import interrupts

    with interrupts.raising():
        try:
            yield
        except DellaError as error:
            if os.environ.get("DELLA_DEBUG"):
                traceback.print_exc()
            message = f"{error}; {hint}" if hint and error.exit_code == 1 else str(error)
            raise fail(message, error.exit_code) from None
        except KeyboardInterrupt:
            raise fail(interrupts.message(), EXIT_INTERRUPTED) from None
        except typer.Exit:
            raise
        except Exception as error:
            if os.environ.get("DELLA_DEBUG"):
                traceback.print_exc()
            if interrupts.received():  # e.g. numba's SystemError around a KeyboardInterrupt
                raise fail(interrupts.message(), EXIT_INTERRUPTED) from None
            raise fail(
                f"unexpected {type(error).__name__}: {error} (set DELLA_DEBUG=1 for the "
                "traceback and report it)",
                1,
            ) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"della {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Merge fine-tuned language models without training."""


JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
AllowPickleOption = Annotated[
    bool,
    typer.Option(
        help="Load models stored only as pytorch_model*.bin, with torch's weights-only "
        "loader (pickles from untrusted sources can still be risky)."
    ),
]
QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar or summary (warnings still show).")
]
PrivateOption = Annotated[bool, typer.Option(help="Create the Hub repository as private.")]
RevisionOption = Annotated[
    str | None, typer.Option(help="Branch to push to (created if missing; default main).")
]
MessageOption = Annotated[str | None, typer.Option(help="Commit message on the Hub.")]


@app.command(cls=_MergeCommand)
def merge(
    recipe: Annotated[
        Path, typer.Argument(help="The YAML recipe.", show_default=False, metavar="RECIPE")
    ],
    out: Annotated[
        Path, typer.Argument(help="Output model folder.", show_default=False, metavar="OUT")
    ],
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    seed: Annotated[int | None, typer.Option(help="Overrides the recipe's seed.")] = None,
    out_shard_size: Annotated[str, typer.Option(help="Largest shard, e.g. 5GB, 500MB.")] = "5GB",
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing output folder of model files only.")
    ] = False,
    resume: Annotated[
        bool, typer.Option(help="Continue a merge that was killed, keeping its verified shards.")
    ] = False,
    strict: Annotated[
        bool, typer.Option(help="Fail on tensors missing from a model and on NaN/Inf inputs.")
    ] = False,
    allow_pickle: AllowPickleOption = False,
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="Compute threads (default: every core this process may use)."),
    ] = None,
    allow_nonfinite: Annotated[
        bool,
        typer.Option(
            help="Publish (and push) an output that holds NaN or Inf; by default such an "
            "output is an error and nothing is published."
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option(help="Plan only: check everything, write nothing.")
    ] = False,
    push_to_hub: Annotated[
        str | None, typer.Option(help="Then upload OUT to this Hub repository (org/name).")
    ] = None,
    private: PrivateOption = False,
    revision: RevisionOption = None,
    commit_message: MessageOption = None,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
    keep_intermediates: Annotated[
        Path | None,
        typer.Option(
            help="Multi-stage files: keep each named stage's output in this folder (by "
            "default they go to a temporary folder beside OUT, removed at the end).",
            metavar="DIR",
        ),
    ] = None,
    part: Annotated[
        str | None,
        typer.Option(help="Compute only part I of N (e.g. 2/8) into OUT's parts folder."),
    ] = None,
    assemble: Annotated[
        bool, typer.Option(help="Check the parts' shards, then write and publish OUT.")
    ] = False,
    ray: Annotated[
        str | None,
        typer.Option(
            metavar="[ADDRESS]",
            help="Run the parts as tasks on the Ray cluster at ADDRESS (alone: the cluster "
            "this machine belongs to).",
        ),
    ] = None,
    parts: Annotated[
        int | None, typer.Option(help="With --ray: the number of parts (default: nodes).")
    ] = None,
) -> None:
    """Merge the models of RECIPE into the folder OUT (and push it with --push-to-hub).
    A RECIPE of several YAML documents is a multi-stage file: its stages run in order."""
    from della_cli.api import MergeOptions
    from della_cli.cli_parts import check_part_options, merge_in_parts

    _loaded()

    with reported_errors():
        options = MergeOptions(
            device=device,
            seed=seed,
            out_shard_bytes=parse_size(out_shard_size),
            overwrite=overwrite,
            resume=resume,
            strict=strict,
            allow_pickle=allow_pickle,
            threads=threads,
            allow_nonfinite=allow_nonfinite,
        )
        options.progress = not (quiet or as_json)
        # Push credentials are checked once the recipe and the models have passed the plan
        # (a typo in the recipe is exit 2 naming the field, not a missing token), and before
        # a merge that may take hours.
        check_push = _push_check(push_to_hub)
        if check_part_options(part, assemble, ray, parts, dry_run, recipe, bool(push_to_hub)):
            if check_push:
                check_push()
            report = merge_in_parts(
                recipe, out, options, part, assemble, ray, parts, quiet, as_json
            )
            if report is None:  # a part: its summary is printed
                return
        elif dry_run:
            _dry_run(recipe, out, options, as_json, check_push)
            return
        else:
            report = _merge_file(
                recipe, out, options, quiet or as_json, check_push, keep_intermediates
            )
    summary = report.to_dict()
    if not as_json and not quiet:
        typer.echo(
            f"merged {report.tensors} tensors into {report.output} "
            f"({report.shards} shard(s), {human_size(report.bytes)}) in {report.seconds:.1f}s"
        )
    if push_to_hub:
        summary["url"] = _push(
            out, push_to_hub, private, revision, commit_message, silent=as_json or quiet
        )
    if as_json:
        typer.echo(json.dumps(summary))


def _push_check(repo_id: str | None):
    """What checks, before the work, that a push to ``repo_id`` can be made (None: no push)."""
    if not repo_id:
        return None

    def check(plan=None) -> None:
        from della_cli.hub import check_can_push

        check_can_push(repo_id)

    return check


def _push(out: Path, repo_id: str, private, revision, message, silent: bool) -> str:
    """Push a folder; a failure keeps the folder and says how to push it again."""
    from della_cli.api import push_model

    with reported_errors(f"{out} is intact; push it later with `della push {out} {repo_id}`"):
        url = push_model(out, repo_id, private, revision, message)
    if not silent:
        typer.echo(f"pushed {out} to {url}")
    return url


@app.command(cls=_Command)
def push(
    folder: Annotated[
        Path, typer.Argument(help="A merged model folder.", show_default=False, metavar="FOLDER")
    ],
    repo_id: Annotated[
        str, typer.Argument(help="Hub repository, org/name.", show_default=False, metavar="REPO_ID")
    ],
    private: PrivateOption = False,
    revision: RevisionOption = None,
    commit_message: MessageOption = None,
    as_json: JsonOption = False,
) -> None:
    """Upload FOLDER to the Hub repository REPO_ID in one commit (created if missing)."""
    url = _push(folder, repo_id, private, revision, commit_message, silent=as_json)
    if as_json:
        typer.echo(json.dumps({"folder": str(folder), "repo_id": repo_id, "url": url}))


def _merge_file(recipe: Path, out: Path, options, quiet: bool, on_planned, keep: Path | None):
    """Merge a recipe file, or each stage of a multi-stage file (the final stage's report)."""
    from della_cli.errors import PlanError
    from della_cli.io import interrupts
    from della_cli.io.output import check_destination
    from della_cli.stages import final_stage, plan_stages, read_stages, run_stages, stage_problems

    stages = read_stages(recipe)
    if stages is None:
        return _merge_with_progress(recipe, out, options, quiet, on_planned)
    check_destination(out, options.overwrite, [], recipe)  # before any stage runs
    problems = stage_problems(plan_stages(stages, out, options))
    if problems:  # every stage planned before the first one runs
        raise PlanError(problems)
    last = final_stage(stages)
    checks = [on_planned]  # push credentials: checked once, after the first stage's plan

    def merge(stage, bound, destination: Path):
        report = _merge_with_progress(
            bound, destination, options, quiet, checks.pop() if checks else None
        )
        if stage is not last:
            interrupts.forget_published()  # an intermediate is no output of this command
            if not quiet:
                typer.echo(
                    f"{stage.label}: merged {report.tensors} tensors into {destination}", err=True
                )
        return report

    done = run_stages(stages, out, keep, merge)
    return next(report for stage, _, report in done if stage is last)


def _merge_with_progress(recipe, out: Path, options, quiet: bool, on_planned=None):
    from della_cli.api import run_merge

    show_bar = not quiet and sys.stderr.isatty()
    bar = None

    def on_start(plan) -> None:
        nonlocal bar
        if show_bar:
            from tqdm import tqdm  # only for a bar: batch runs skip its import (8 ms)

            bar = tqdm(
                total=plan.output_bytes,
                unit="B",
                unit_scale=True,
                desc="merging",
                file=sys.stderr,
                postfix={"tensors": f"0/{len(plan.jobs)}"},
            )
            bar.jobs_total, bar.jobs_done = len(plan.jobs), 0

    def on_progress(job) -> None:
        if bar is not None:
            bar.jobs_done += 1
            bar.set_postfix(tensors=f"{bar.jobs_done}/{bar.jobs_total}", refresh=False)
            bar.update(job.numel * _itemsize(job.out_dtype))

    def on_warning(message: str) -> None:
        # Never silenced: --quiet drops the progress bar and the summary, not what went wrong.
        (bar.write if bar else lambda m: typer.echo(m, err=True))(f"warning: {message}")

    def on_notice(message: str) -> None:
        if not quiet:
            (bar.write if bar else lambda m: typer.echo(m, err=True))(f"note: {message}")

    try:
        return run_merge(
            recipe, out, options, on_start, on_progress, on_warning, on_planned, on_notice
        )
    finally:
        if bar is not None:
            bar.close()


def _itemsize(code: str) -> int:
    from della_cli.io.dtypes import itemsize

    return itemsize(code)


def _dry_run(recipe_path: Path, out: Path | None, options, as_json: bool, check_push=None) -> None:
    """Plan without downloading or writing; print the report; exit 2 when it cannot run.
    ``check_push`` checks push credentials once the plan has passed."""
    from della_cli.errors import PlanError
    from della_cli.preflight import plan_merge
    from della_cli.stages import read_stages

    stages = read_stages(recipe_path)
    if stages is not None:
        _plan_stages(stages, out, options, as_json, check_push)
        return
    report = plan_merge(recipe_path, out, options)
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
        if not report.can_run:
            raise typer.Exit(2)
        if check_push:
            check_push()
        return
    if not report.can_run:
        raise PlanError(report.problems)
    if check_push:
        check_push()
    for message in report.warnings:
        typer.echo(f"warning: {message}", err=True)
    for line in report.summary_lines():
        typer.echo(line)
    typer.echo(
        "the merge can run; nothing downloaded, nothing written" + (" (dry run)" if out else "")
    )


def _plan_stages(stages, out: Path | None, options, as_json: bool, check_push=None) -> None:
    """``_dry_run`` of a multi-stage file: every stage planned in the order it runs."""
    from della_cli.errors import PlanError
    from della_cli.stages import plan_stages, stage_problems

    plans = plan_stages(stages, out, options)
    problems = stage_problems(plans)
    if as_json:
        typer.echo(json.dumps({"stages": [p.to_dict() for p in plans], "can_run": not problems}))
        if problems:
            raise typer.Exit(2)
    elif problems:
        raise PlanError(problems)
    if check_push:
        check_push()
    if as_json:
        return
    for p in plans:
        for message in p.report.warnings if p.report is not None else p.stage.recipe.schema.notes:
            typer.echo(f"warning: {p.stage.label}: {message}", err=True)
    for p in plans:
        reads = (
            f", reads {', '.join(repr(n) for n in p.stage.depends_on)}"
            if p.stage.depends_on
            else ""
        )
        typer.echo(f"{p.stage.label} → {p.output}{reads}")
        lines = p.report.summary_lines() if p.report is not None else [p.unchecked]
        lines = [p.note, *lines] if p.note else lines
        for line in lines:
            typer.echo(f"  {line}")
    typer.echo(
        f"the {len(plans)} stages can run; nothing downloaded, nothing written"
        + (" (dry run)" if out else "")
    )


@app.command(cls=_Command)
def plan(
    recipe: Annotated[
        Path, typer.Argument(help="The YAML recipe.", show_default=False, metavar="RECIPE")
    ],
    out: Annotated[
        Path | None, typer.Option(help="Where the output would go (checked, disk counted).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    out_shard_size: Annotated[str, typer.Option(help="Largest shard, e.g. 5GB, 500MB.")] = "5GB",
    overwrite: Annotated[bool, typer.Option(help="OUT may exist (it would be replaced).")] = False,
    strict: Annotated[
        bool, typer.Option(help="Tensors missing from a model are problems.")
    ] = False,
    allow_pickle: AllowPickleOption = False,
    parts: Annotated[
        int | None,
        typer.Option(help="Also show each of N parts' download, reads, writes, memory, disk."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Plan the merge of RECIPE from headers only, downloading no weights (exit 0 when it can
    run, 2 when it cannot)."""
    from della_cli.api import MergeOptions

    with reported_errors():
        options = MergeOptions(
            device=device,
            out_shard_bytes=parse_size(out_shard_size),
            overwrite=overwrite,
            strict=strict,
            allow_pickle=allow_pickle,
        )
        options.progress = not as_json
        if parts is not None:
            from della_cli.cli_parts import print_parts

            print_parts(recipe, out, options, parts, as_json)
            return
        _dry_run(recipe, out, options, as_json)


@app.command(cls=_Command)
def inspect(
    recipe: Annotated[
        Path, typer.Argument(help="The YAML recipe.", show_default=False, metavar="RECIPE")
    ],
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    png: Annotated[Path | None, typer.Option(help="Write heatmaps over layers as a PNG.")] = None,
    html: Annotated[
        Path | None, typer.Option(help="Write heatmaps and table as a self-contained HTML page.")
    ] = None,
    allow_pickle: AllowPickleOption = False,
    as_json: JsonOption = False,
) -> None:
    """Show where the models of RECIPE conflict: task-vector norms, cosines, sign conflicts,
    top-d overlap and what each sparsifier keeps, per tensor group and layer (writes nothing
    but the pictures asked for)."""
    from della_cli.api import MergeOptions
    from della_cli.inspection import picture, table
    from della_cli.inspection.run import inspect_recipe

    _loaded()
    with reported_errors():
        options = MergeOptions(device=device, allow_pickle=allow_pickle, progress=not as_json)
        if png is not None:
            picture.require_matplotlib()
        report = inspect_recipe(recipe, options)
        if png is not None:
            picture.write_png(report, png)
        if html is not None:
            picture.write_html(report, html)
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
        return
    for message in report.warnings:
        typer.echo(f"warning: {message}", err=True)
    for line in table.table_lines(report):
        typer.echo(line)


@app.command(cls=_Command)
def verify(
    folder: Annotated[
        Path, typer.Argument(help="A model folder.", show_default=False, metavar="FOLDER")
    ],
    generate: Annotated[
        bool, typer.Option(help="Also load the model with transformers and generate.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Check a model folder: files, shapes against config, NaN/Inf, tokenizer (exit 0 healthy,
    1 not, 2 when FOLDER is not a folder)."""
    from della_cli.errors import UsageError
    from della_cli.verify import verify_model

    with reported_errors():
        if not folder.is_dir():
            raise UsageError(f"{folder} is not a folder")
        report = verify_model(folder, generate=generate)
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        for check in report.checks:
            typer.echo(f"{'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}")
        typer.echo(f"{folder}: {'healthy' if report.healthy else 'NOT healthy'}")
    if not report.healthy:
        raise typer.Exit(1)


@app.command(cls=_Command)
def methods(as_json: JsonOption = False) -> None:
    """List the merge methods, their parameters and defaults."""
    from della_cli.methods import METHODS

    rows = []
    for spec in METHODS.values():
        rows.append(
            {
                "name": spec.name,
                "summary": spec.summary,
                "paper": spec.paper,
                "needs_base": spec.needs_base,
                "sign_consensus": spec.sign_consensus,
                "normalize_default": spec.normalize_default,
                "model_parameters": list(spec.expert_parameters),
                "merge_parameters": list(spec.global_parameters),
                "required": list(spec.required_parameters),
                "parameters": _catalog_parameters(spec),
                "passes": list(spec.catalog.passes) if spec.catalog else ["merge"],
            }
        )
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for row in rows:
        typer.echo(f"{row['name']}: {row['summary']}")
        typer.echo(f"    paper: {row['paper']}")
        if row["parameters"] is not None:
            described = [_described_parameter(p) for p in row["parameters"]]
            typer.echo(f"    parameters: {'; '.join(described) or 'none'}")
            typer.echo(f"    passes over each tensor: {len(row['passes'])}")
            continue
        typer.echo(
            f"    per model: {', '.join(row['model_parameters'])} (weight defaults to 1.0"
            + (f"; required: {', '.join(row['required'])})" if row["required"] else ")")
        )
        typer.echo(
            f"    merge-wide: {', '.join(row['merge_parameters'])} (normalize defaults "
            f"to {str(row['normalize_default']).lower()}"
            + ("; lambda to 1.0" if "lambda" in row["merge_parameters"] else "")
            + ")"
        )


def _catalog_parameters(spec) -> list[dict] | None:
    """A catalog method's parameters (``methods.catalog``), or None for the pipeline's."""
    if spec.catalog is None:
        return None
    return [
        {
            "name": p.name,
            "scope": p.scope.value,
            "default": p.default,
            "required": p.required,
            "minimum": p.minimum,
            "maximum": p.maximum,
            "meaning": p.meaning,
        }
        for p in spec.catalog.parameters
    ]


def _described_parameter(parameter: dict) -> str:
    scope = {"shared": "merge-wide", "per_input": "per input", "per_non_base": "per model"}
    default = "required" if parameter["required"] else f"default {parameter['default']}"
    bounds = [
        f"≥ {parameter['minimum']:g}" if parameter["minimum"] is not None else "",
        f"≤ {parameter['maximum']:g}" if parameter["maximum"] is not None else "",
    ]
    extra = ", ".join([default, *[b for b in bounds if b]])
    return f"{parameter['name']} ({scope[parameter['scope']]}, {extra})"


@app.command(cls=_Command)
def demo(
    folder: Annotated[
        Path,
        typer.Argument(
            help="Where to build the example models (kept for the next steps).",
            metavar="FOLDER",
        ),
    ] = Path("della-demo"),
) -> None:
    """Build tiny example models in FOLDER, merge them with DELLA, load and run the result."""
    from della_cli.demo import run_demo

    with reported_errors():
        run_demo(folder, typer.echo)


from della_cli.cli_sweep import sweep_command  # noqa: E402  (its options in their own module)

app.command("sweep", cls=_Command)(sweep_command(reported_errors, lambda: _loaded()))


def main() -> None:
    """The ``della`` command (the console script; tests call ``app``).

    Python's cyclic garbage collector is paused while a command loads its modules (numpy and
    the rest allocate hundreds of thousands of objects, which the collector would walk again
    and again as they load), and what was loaded is frozen before the process exits (its last
    collections need not walk it either). Together that is 45 ms of every command (importing
    della's API and exiting: 320 -> 273 ms, medians of 21). Long commands turn it back on
    once loaded (``_loaded``). The console script enters through ``della_cli.__main__``,
    which installs the signal handlers before this module (and typer) is even imported.
    """
    from della_cli.io import interrupts

    interrupts.install()  # again after __main__ (harmless); the first time for other callers
    global _collector_paused
    gc.disable()
    _collector_paused = True
    try:
        app()
    except SystemExit as done:
        if interrupts.received():
            _exit_now(done.code)
        raise
    finally:
        interrupts.ignore()  # the command is over: its exit status must stand
        gc.freeze()


def _exit_now(code: object) -> None:
    """End an interrupted command with its exit status, now, past the interpreter's exit.

    A KeyboardInterrupt raised while code made by ``exec`` runs (dataclasses, numba and others
    make functions that way, often while a module is imported mid-merge) leaves CPython
    believing it went unhandled, however it was caught; under ``python -m`` the interpreter
    then kills itself by SIGINT after della has reported exit 130. The clean-up is done by
    now, so the process leaves with its status, its output flushed."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code if isinstance(code, int) else EXIT_INTERRUPTED)


_collector_paused = False  # set by main for the process it runs


def _loaded() -> None:
    """A command has imported what it needs: where ``main`` paused the collector, freeze what
    was loaded (later collections skip it) and turn the collector back on for the work."""
    global _collector_paused
    if _collector_paused:
        _collector_paused = False
        gc.freeze()
        gc.enable()
