"""``della sweep``: merge every candidate of a grid or a random search, score each with the user's
command, keep the best.

Everything that can be refused is refused before anything is written: the swept parameters
(known to the method, each candidate's recipe checked by the recipe's rules), the evaluation
command, the sweep folder, the models, and every candidate's plan.

The inputs are read as few times as the memory allows: the recipe is read and the models opened
once, every candidate is planned from the headers already read (``MergeSession.with_recipe``),
and the candidates are merged in batches that fit the memory budget, each batch in one
streaming pass over the inputs (``sweep.batch``); each candidate of a batch is then scored.

The sweep resumes: its state file records every score as soon as it is known, each candidate's
merge is published atomically as every merge is (a killed batch resumes each of its candidates
from its verified shards), and a candidate whose merge exists but whose score does not is only
evaluated again.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from della_cli.api import MergeOptions, MergeSession
from della_cli.errors import MergeFailure, UsageError
from della_cli.io import interrupts
from della_cli.io.output import check_destination
from della_cli.recipe import Recipe, load_recipe
from della_cli.sweep.batch import batches, default_memory_budget, merge_batch, working_memory
from della_cli.sweep.candidates import (
    Candidate,
    build_candidates,
    parameter_names,
    sweep_fingerprint,
)
from della_cli.sweep.evaluate import ScoreError, check_command, evaluate
from della_cli.sweep.grid import check_axes, grid_settings, parse_axis, random_settings
from della_cli.sweep.plot import write_plot
from della_cli.sweep.results import (
    SettingResult,
    SweepState,
    best_of,
    kept_candidate,
    summarize,
    write_results,
)

CANDIDATES = "candidates"


@dataclass
class SweepRequest:
    recipe: Path
    out: Path
    eval_command: str
    grid: list[str] = field(default_factory=list)
    random: list[str] = field(default_factory=list)
    trials: int | None = None
    seeds: int = 1
    score_field: str | None = None
    minimize: bool = False
    keep_all: bool = False
    quiet: bool = False  # the evaluation command's stderr hidden
    memory: int | None = None  # bytes a batch of merges may hold (None: half the available)
    options: MergeOptions = field(default_factory=MergeOptions)


@dataclass
class SweepReport:
    folder: Path
    results: list[SettingResult]
    best: SettingResult | None
    kept: Path | None
    plot: Path | None
    merged: int  # candidates merged by this run
    evaluated: int  # candidates scored by this run
    resumed: int  # candidates scored by an earlier run
    failures: dict[str, str]


def plan_candidates(request: SweepRequest) -> tuple[Recipe, list[Candidate]]:
    """The recipe and the sweep's candidates, every one checked (UsageError, exit 2)."""
    if request.seeds < 1 or (request.trials is not None and request.trials < 1):
        raise UsageError("--seeds and --trials: must be at least 1")
    recipe = load_recipe(request.recipe)
    refs = recipe.model_refs
    axes = [parse_axis("--grid", text, refs) for text in request.grid]
    axes += [parse_axis("--random", text, refs) for text in request.random]
    if not axes:
        raise UsageError("della sweep: give what to vary, e.g. --grid density=0.3,0.5,0.7")
    check_axes(axes, recipe.method.name, *parameter_names(recipe))
    if request.trials is not None:
        settings = random_settings(axes, request.trials, recipe.seed)
    elif request.random:
        raise UsageError(f"--random {request.random[0]}: a random search needs --trials N")
    else:
        settings = grid_settings(axes)
    check_command(request.eval_command)
    return recipe, build_candidates(recipe, axes, settings, request.seeds)


def run_sweep(
    request: SweepRequest,
    say: Callable[[str], None] = lambda line: None,
    on_warning: Callable[[str], None] | None = None,
) -> SweepReport:
    """Run (or resume) the sweep; ``say`` receives a line of progress per candidate step,
    ``on_warning`` each distinct warning of the merges (by default, ``say`` it)."""
    recipe, candidates = plan_candidates(request)
    fingerprint = sweep_fingerprint(recipe, candidates, request.eval_command, request.score_field)
    state = _sweep_state(request.out, fingerprint)
    shared, sessions = _planned_sessions(recipe, candidates, request.options)
    resumed = sum(candidate.name in state.scores for candidate in candidates)
    merged = evaluated = 0
    warned: set[str] = set()  # each merge warning once, not once per candidate

    def warn(message: str) -> None:
        if message not in warned:
            warned.add(message)
            (on_warning or (lambda line: say(f"warning: {line}")))(message)

    try:
        _check_destinations(request.out, candidates, shared)
        request.out.mkdir(parents=True, exist_ok=True)
        state.save(request.out)
        for batch in _batches(request, candidates, sessions, state):
            steps = {n: f"[{n + 1}/{len(candidates)}] {_described(candidates[n])}" for n in batch}
            merged += _merge(request, batch, candidates, sessions, warn, say, steps)
            for number in batch:
                evaluated += _evaluate(request, candidates[number], state, say, steps[number])
    finally:
        shared.close()  # the models every candidate shares
    return _finish(request, candidates, state, merged, evaluated, resumed)


def _described(candidate: Candidate) -> str:
    values = " ".join(f"{name}={value}" for name, value in candidate.values.items())
    return f"{candidate.name} {values}"


def _batches(
    request: SweepRequest, candidates: list[Candidate], sessions: list, state: SweepState
) -> list[list[int]]:
    """The unscored candidates (indices), in batches: those merged by an earlier run first, one
    by one (they are only scored), then those to merge, as many at once as the budget holds."""
    unscored = [n for n, c in enumerate(candidates) if c.name not in state.scores]
    done = [n for n in unscored if (request.out / CANDIDATES / candidates[n].name).is_dir()]
    to_merge = [n for n in unscored if n not in done]
    budget = request.memory or default_memory_budget(sessions[0].device)
    costs = [working_memory(sessions[n], sessions[n].plan) for n in to_merge]
    cut = batches(costs, budget)
    return [[n] for n in done] + [[to_merge[i] for i in batch] for batch in cut]


def _merge(
    request: SweepRequest, batch: list[int], candidates: list, sessions: list, warn, say, steps
) -> int:
    """Merge the batch's candidates whose output is not already there (published whole, so
    complete) in one pass over the inputs; a batch killed earlier resumes each candidate from
    its verified shards. Returns how many it merged."""
    folders = {n: request.out / CANDIDATES / candidates[n].name for n in batch}
    todo = [n for n in batch if not folders[n].is_dir()]
    together = f" (one pass over the inputs for {len(todo)})" if len(todo) > 1 else ""
    for number in todo:
        say(f"{steps[number]}: merging{together}")
    if todo:
        merge_batch([sessions[n] for n in todo], [folders[n] for n in todo], warn)
        interrupts.forget_published()  # candidates, not the output this command is run for
    return len(todo)


def _evaluate(request: SweepRequest, candidate: Candidate, state: SweepState, say, step) -> int:
    """Score a candidate and record it (or its failure) in the state file at once."""
    folder = request.out / CANDIDATES / candidate.name
    try:
        score = evaluate(request.eval_command, folder, request.score_field, request.quiet)
    except ScoreError as error:
        state.failures[candidate.name] = str(error)
        state.save(request.out)
        say(f"{step}: evaluation failed: {error}")
        return 0
    state.scores[candidate.name] = score
    state.failures.pop(candidate.name, None)
    state.save(request.out)
    say(f"{step}: score {score:.6g}")
    return 1


def _sweep_state(folder: Path, fingerprint: str) -> SweepState:
    """The state of the sweep in ``folder`` to resume, or a new one where there is none."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder}: exists and is a file; choose a folder")
    if not folder.exists():
        return SweepState(fingerprint)
    state = SweepState.load(folder)
    if state is None and any(folder.iterdir()):
        raise UsageError(f"--out {folder}: exists and holds no della sweep; choose another folder")
    if state is not None and state.fingerprint != fingerprint:
        raise UsageError(
            f"--out {folder}: holds a sweep of another recipe, grid or evaluation command; "
            "choose another folder, or delete it to start over"
        )
    return state or SweepState(fingerprint)


def _check_destinations(folder: Path, candidates: list[Candidate], shared: MergeSession) -> None:
    """Each candidate's output may be written where it goes (not inside an input model, not
    over the recipe), checked before the sweep folder is made."""
    readers = [shared.inputs.base, *shared.inputs.experts]
    inputs = [reader.folder for reader in readers if reader is not None]
    for candidate in candidates:
        destination = folder / CANDIDATES / candidate.name
        if not destination.exists():
            check_destination(destination, False, inputs, shared.recipe.path)


def _planned_sessions(
    recipe: Recipe, candidates: list[Candidate], options: MergeOptions
) -> tuple[MergeSession, list[MergeSession]]:
    """The models opened once, and a session per candidate over them, every plan made before
    any write (a PlanError, exit 2, leaves nothing behind); Hub models' weights downloaded
    once, after every plan has passed."""
    shared = MergeSession.open(recipe, options)
    try:
        per_candidate = MergeOptions(**{**vars(options), "resume": True, "overwrite": False})
        sessions = [shared.with_recipe(c.recipe, per_candidate) for c in candidates]
        for session in sessions:
            session.build_plan()
        shared.download_weights()
        for session in sessions:
            session.downloaded = True
    except BaseException:
        shared.close()
        raise
    return shared, sessions


def _finish(
    request: SweepRequest,
    candidates: list[Candidate],
    state: SweepState,
    merged: int,
    evaluated: int,
    resumed: int,
) -> SweepReport:
    """The results table and picture; the best setting's best-scoring merge kept and, unless
    ``keep_all``, every other candidate's merge deleted."""
    results = summarize(candidates, state.scores)
    best = best_of(results, request.minimize)
    if best is None:
        first = next(iter(state.failures.values()), "no candidate was scored")
        raise MergeFailure(f"no candidate has a score ({first}); the merges are kept to rerun")
    state.kept = kept_candidate(best, request.minimize)
    state.save(request.out)
    if not request.keep_all:
        for folder in sorted((request.out / CANDIDATES).iterdir()):
            if folder.name != state.kept:
                shutil.rmtree(folder)
    extra = {
        "recipe": str(request.recipe),
        "eval": request.eval_command,
        "score_field": request.score_field,
        "minimize": request.minimize,
    }
    write_results(request.out, results, state, extra)
    score_name = request.score_field or "score"
    plot = write_plot(request.out, results, best, score_name)
    return SweepReport(
        folder=request.out,
        results=results,
        best=best,
        kept=request.out / CANDIDATES / state.kept,
        plot=plot,
        merged=merged,
        evaluated=evaluated,
        resumed=resumed,
        failures=dict(state.failures),
    )
