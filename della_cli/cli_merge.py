"""``della merge`` and ``della push``: a recipe (or each stage of a multi-stage file) merged
with a progress bar on stderr, then the output pushed to the Hub when asked."""

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from della_cli.cli_common import (
    AllowPickleOption,
    DevicesOption,
    JsonOption,
    MessageOption,
    PrivateOption,
    QuietOption,
    RevisionOption,
    loaded,
    reported_errors,
)
from della_cli.cli_plan import print_plan
from della_cli.sizes import human_size, parse_size


def merge(
    recipe: Annotated[
        Path, typer.Argument(help="The YAML recipe.", show_default=False, metavar="RECIPE")
    ],
    out: Annotated[
        Path, typer.Argument(help="Output model folder.", show_default=False, metavar="OUT")
    ],
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    devices: DevicesOption = None,
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

    loaded()

    with reported_errors():
        options = MergeOptions(
            device=devices or device,
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
            print_plan(recipe, out, options, as_json, check_push)
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
    from della_cli.stage_plans import plan_stages, stage_problems
    from della_cli.stages import final_stage, read_stages, run_stages

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
