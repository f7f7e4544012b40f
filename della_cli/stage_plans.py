"""``della plan`` of a multi-stage file: every stage planned from headers before the first one
runs, a stage that reads an earlier one's output planned against a stand-in of that output
(its headers as the earlier plan will write them, as a sparse file), each problem naming its
stage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from della_cli.recipe import Recipe
from della_cli.stages import Stage, bind, final_stage


@dataclass
class StagePlan:
    """``della plan`` of one stage: its report, or why its tensors cannot be planned."""

    stage: Stage
    output: str  # "OUT" or the intermediate it becomes
    report: object | None  # a plan_report.PlanReport
    unchecked: str | None = None  # why there is no report
    note: str | None = None  # how the report was made, where it leans on earlier plans

    def to_dict(self) -> dict:
        return {
            "name": self.stage.name,
            "document": self.stage.number,
            "output": self.output,
            "depends_on": list(self.stage.depends_on),
            "plan": self.report.to_dict() if self.report is not None else None,
            "unchecked": self.unchecked,
            "note": self.note,
        }


def plan_stages(stages: list[Stage], out: Path | None, options) -> list[StagePlan]:
    """Plan every stage from headers. A stage that reads an earlier stage's output is planned
    against a stand-in of that output made from the earlier plan (``stand_in``: its tensors'
    names, shapes and dtypes, its config), so shape and presence problems show before any
    merge; what the earlier stage's values will be is known only once it runs."""
    import tempfile

    last = final_stage(stages)
    plans: list[StagePlan] = []
    with tempfile.TemporaryDirectory(prefix="della-plan-stages-") as scratch:
        planned: dict[str, Path | None] = {}  # each named stage's stand-in (None: no plan)
        for stage in stages:
            output = "OUT" if stage is last else f"intermediate '{stage.name}'"
            missing = [name for name in stage.depends_on if planned.get(name) is None]
            if missing:
                names = ", ".join(f"'{name}'" for name in missing)
                plural = "s" if len(missing) > 1 else ""
                unchecked = f"not planned: it reads stage{plural} {names}, which cannot run"
                plans.append(StagePlan(stage, output, None, unchecked))
                planned[stage.name or ""] = None
                continue
            folders = {name: planned[name] for name in stage.depends_on}
            report, plan, config = _plan_one(
                bind(stage, folders), out if stage is last else None, options
            )
            note = None
            if stage.depends_on:
                earlier = ", ".join(f"'{name}'" for name in stage.depends_on)
                plural = "s" if len(stage.depends_on) > 1 else ""
                note = (
                    f"planned from the plan of stage{plural} {earlier} (the output's tensors, "
                    "shapes and dtypes); the values are known once it runs"
                )
            _relabel(report, folders)
            plans.append(StagePlan(stage, output, report, note=note))
            if stage.name:
                folder = Path(scratch) / stage.name
                planned[stage.name] = stand_in(plan, config, folder) if plan else None
    return plans


def stage_problems(plans: list[StagePlan]) -> list[str]:
    """Every stage's plan problems, each naming its stage."""
    return [
        f"{plan.stage.label}: {problem}"
        for plan in plans
        if plan.report is not None
        for problem in plan.report.problems
    ]


def _relabel(report, folders: dict[str, Path]) -> None:
    """The report naming each earlier stage by its name, not its stand-in's folder."""

    def named(text: str) -> str:
        for name, folder in folders.items():
            text = text.replace(str(folder), name)
        return text

    report.problems = [named(problem) for problem in report.problems]
    report.warnings = [named(warning) for warning in report.warnings]
    for group in report.groups:
        if "parameters" in group:
            group["parameters"] = {named(k): v for k, v in group["parameters"].items()}


def _plan_one(recipe: Recipe, out: Path | None, options):
    """``preflight.plan_merge`` of a recipe, with its plan and its reference's config."""
    from della_cli.preflight import assess
    from della_cli.session import MergeSession

    session = MergeSession.open(recipe, options)
    try:
        report, plan = assess(session, out)
    finally:
        session.close()
    reference = session.inputs.base or session.inputs.experts[0]
    return report, plan, reference.config


def stand_in(plan, config: dict | None, folder: Path) -> Path:
    """A model folder whose headers are those ``plan`` will write (each shard's data a hole of
    its size: a sparse file, no disk used) with the reference's config, for planning a stage
    that reads the output before it exists."""
    import json

    from della_cli.io.writer import SHARD_METADATA, encode_header, shard_file_names
    from della_cli.layer_map import output_config

    folder.mkdir(parents=True)
    names = shard_file_names(len(plan.shards))
    for name, shard in zip(names, plan.shards, strict=True):
        header = encode_header(shard, SHARD_METADATA)
        with (folder / name).open("wb") as handle:
            handle.write(header)
            handle.truncate(len(header) + sum(tensor.nbytes for tensor in shard))
    if len(names) > 1:
        weight_map = {t.name: n for n, shard in zip(names, plan.shards, strict=True) for t in shard}
        index = {"metadata": {"total_size": plan.output_bytes}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = dict(output_config(config, plan.layer_map) or {})
    if plan.config_dtype:
        config["torch_dtype"] = plan.config_dtype
    (folder / "config.json").write_text(json.dumps(config))
    return folder
