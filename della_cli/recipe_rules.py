"""The rules of a recipe that span fields, checked once its fields are: the method and its base,
duplicate models, which parameters the method takes, and the bounds that join them (density
with epsilon or gamma, a catalog method's ranges), for every tensor where values vary."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from della_cli.errors import RecipeError
from della_cli.methods.catalog import BasePolicy, Parameter, Scope
from della_cli.recipe_compat import check_method
from della_cli.recipe_fields import parameter_attribute
from della_cli.recipe_schema import EXPERT_FIELDS
from della_cli.recipe_scopes import Member, ParameterGroup, parameter_groups
from della_cli.recipe_settings import breakpoints, leaves, sample_names, varies
from della_cli.recipe_slices import check_slice_bases
from della_cli.recipe_tokenizer import check_token_models

if TYPE_CHECKING:
    from della_cli.recipe import Recipe


def check_rules(recipe: Recipe) -> None:
    """Rules that span fields: method, base, duplicates, which parameters apply, bounds."""
    schema = recipe.schema
    check_method(schema.merge_method)
    spec = recipe.method
    if not schema.models:
        raise RecipeError("models: must list at least one model")
    if schema.slices is not None:
        check_slice_bases(schema.slices, schema.base_model, spec)
    elif spec.needs_base and not schema.base_model:
        what = "merges task vectors" if spec.catalog is None else "merges into a base"
        raise RecipeError(f"base_model: {spec.name} {what} and needs a base_model")
    seen: dict[str, int] = {}
    for index, ref in enumerate(recipe.model_refs):
        if ref in seen:
            raise RecipeError(
                f"models.{index}.model: '{ref}' is listed twice (also models.{seen[ref]})"
            )
        seen[ref] = index
    source = schema.tokenizer_source
    if source not in (None, "base", "union", schema.base_model, *recipe.model_refs):
        names = ", ".join(f"'{ref}'" for ref in recipe.model_refs)
        raise RecipeError(
            f"tokenizer_source: '{source}' is neither base nor one of the models ({names}), "
            "nor union"
        )
    check_token_models(schema.tokenizer, schema.base_model, recipe.model_refs)
    _check_parameter_names(recipe)
    for group in parameter_groups(schema):
        if spec.catalog is not None:
            _check_catalog_method(recipe, group)
            continue
        for member in _merged_members(recipe, group):
            _check_expert_values(recipe, member, group)


def _merged_members(recipe: Recipe, group: ParameterGroup) -> list[Member]:
    """The inputs of ``group`` whose own parameters a merge reads: all but a listed base
    where the method merges into the base (``models:`` drops that entry when it is read)."""
    on_deltas = recipe.method.on_deltas
    return [m for m in group.members if not (on_deltas and m.model == group.base)]


def _check_catalog_method(recipe: Recipe, group: ParameterGroup) -> None:
    """A catalog method's input contract, required parameters and ranges (``catalog``), for
    the models or one slice's sources."""
    entry = recipe.method.catalog
    contract = entry.contract
    members = _merged_members(recipe, group)
    inputs = len(members)
    besides = " besides the base"
    if contract.base is BasePolicy.IGNORED:
        besides = " (the base_model counts as one)" if group.adds_base else ""
        listed = group.base in [m.model for m in members]
        inputs += bool(group.base) and not listed and group.adds_base
    elif contract.base is BasePolicy.OPTIONAL and not group.base:
        besides = ""
    least, most = contract.min_models, contract.max_models
    if inputs < least or (most is not None and inputs > most):
        if least == most:
            wanted = f"exactly {least}"
        else:
            wanted = f"at least {least}" if most is None else f"{least} to {most}"
        noun = "input" if contract.base is BasePolicy.IGNORED else "model"
        plural = "" if (most or least) == 1 else "s"
        raise RecipeError(
            f"{group.path}: {entry.name} takes {wanted} {noun}{plural}{besides}, got {inputs}"
        )
    for parameter in entry.parameters:
        attribute = parameter_attribute(parameter.name)
        if parameter.scope is Scope.SHARED:
            for path, block in group.upper:
                if getattr(block, attribute) is not None:
                    _check_catalog_value(entry.name, parameter, getattr(block, attribute), path)
            if all(getattr(block, attribute) is None for _, block in group.upper):
                _check_catalog_value(entry.name, parameter, None, group.upper[-1][0])
            continue
        for member in members:
            blocks = ((member.path, member.parameters), *group.upper)
            where, value = next(
                (
                    (path, getattr(b, attribute))
                    for path, b in blocks
                    if getattr(b, attribute) is not None
                ),
                (group.upper[-1][0], None),
            )
            if value is None and parameter.required:
                where = member.path
            _check_catalog_value(entry.name, parameter, value, where)
    uppers = [block for _, block in group.upper]
    normalize = _first_set(*(b.normalize_weights for b in uppers), True)
    if entry.name == "multislerp" and normalize and len(members) > 1:
        weights = [
            _first_set(m.parameters.weight, *(b.weight for b in uppers), 1.0) for m in members
        ]
        if not any(map(varies, weights)) and sum(weights) == 0:
            raise RecipeError(
                f"{group.path}: the multislerp weights sum to 0, so normalize_weights cannot "
                "divide by their sum; change a weight or set normalize_weights: false"
            )


def _first_set(*values: Any) -> Any:
    """The first value that is set (not None); the last is the default."""
    return next((value for value in values[:-1] if value is not None), values[-1])


def _check_catalog_value(method: str, parameter: Parameter, setting: Any, where: str) -> None:
    """A catalog parameter's value, or each value of its gradient or filters, in range."""
    path = f"{where}.{parameter.name}"
    if setting is None:
        if parameter.required:
            meaning = f" ({parameter.meaning})" if parameter.meaning else ""
            raise RecipeError(f"{path}: {method} needs {parameter.name}{meaning}; add it")
        return
    for value in leaves(setting):
        _check_in_range(parameter, value, path)


def _check_in_range(parameter: Parameter, value: Any, path: str) -> None:
    low, high = parameter.minimum, parameter.maximum
    if value is None or isinstance(value, bool):
        return
    if (low is not None and value < low) or (high is not None and value > high):
        interval = (
            f"[{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}]"
        )
        raise RecipeError(f"{path}: must be in {interval}, got {value}")


def _check_parameter_names(recipe: Recipe) -> None:
    """What mergekit knows but a method ignores was dropped with a note (recipe_compat); what
    is left that the method does not take is a ``rescale: true`` that mergekit would apply."""
    spec = recipe.method
    allowed = {*spec.expert_parameters, *spec.global_parameters, "int8_mask"}
    for key in recipe.schema.parameters.given:
        if key not in allowed:
            takes = ", ".join(spec.expert_parameters + spec.global_parameters)
            why = (
                "; mergekit would scale its kept deltas by their L1 norm, which della does only "
                "for the random methods"
                if key == "rescale"
                else ""
            )
            raise RecipeError(
                f"parameters.{key}: {spec.name} does not use {key} (it takes {takes}){why}"
            )


def _check_expert_values(recipe: Recipe, member: Member, group: ParameterGroup) -> None:
    """The bounds that join density with epsilon or gamma, for every tensor: where values vary,
    at every name the filters tell apart and every gradient's breakpoint (between two, each
    bound is linear in t, so holding at both ends it holds between)."""
    blocks = ((member.path, member.parameters), *group.upper)
    settings = [getattr(block, name) for _, block in blocks for name in EXPERT_FIELDS]
    if not any(varies(setting) for setting in settings):
        _check_expert_window(recipe, blocks, "", 0.0, "")
        return
    for name in sample_names(settings):
        for t in breakpoints(settings):
            parts = "' and '".join(name.split("\0"))
            place = f" at layer position t = {t:g}" + (
                f" for tensors containing '{parts}'" if name else ""
            )
            _check_expert_window(recipe, blocks, name, t, place)


def _check_expert_window(
    recipe: Recipe, blocks: tuple[tuple[str, Any], ...], tensor: str, t: float, where: str
) -> None:
    """``blocks``: (path, parameter block), the model's own first, the top level's last."""

    def path(name: str) -> str:
        found = (p for p, block in blocks if getattr(block, name) is not None)
        return f"{next(found, blocks[-1][0])}.{name}"

    params = recipe.expert_params_from(tuple(block for _, block in blocks), tensor, t)
    density = params.density
    in_window = (
        params.epsilon is None
        or density is None
        or density >= 1
        or (density - params.epsilon > 0 and density + params.epsilon <= 1)
    )
    if not in_window:
        defaulted = all(block.epsilon is None for _, block in blocks)
        whose, fix = (" (mergekit's default)", "set") if defaulted else ("", "lower")
        raise RecipeError(
            f"{path('epsilon')}: keep probabilities d ± ε must lie in (0, 1], but density "
            f"{density} and epsilon {params.epsilon}{whose} give [{density - params.epsilon:g}, "
            f"{density + params.epsilon:g}]{where}; {fix} epsilon"
        )
    if params.gamma is not None and density is not None and 1 > density > 1 - params.gamma:
        raise RecipeError(
            f"{path('gamma')}: density {density:g} plus gamma {params.gamma:g} exceeds 1{where}; "
            "lower one of them"
        )
