"""What ``della plan`` reports: the plan's groups of tensors, sizes, memory, disk and problems
(``--json``: one object), and its human form, line by line. ``preflight`` fills it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from della_cli.plan_parameters import parameter_lines
from della_cli.sizes import human_size


@dataclass
class PlanReport:
    """What ``della plan`` prints (``--json``: this as one object, with ``can_run``)."""

    method: str
    device: str
    inputs: dict[str, str]  # Hub reference -> the commit it resolved to
    adapters: dict[str, dict] = field(default_factory=dict)  # model+adapter -> the adapter
    groups: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tensors: int = 0
    merged: int = 0
    copied: int = 0
    shards: int = 0
    output_bytes: int = 0
    download_bytes: int = 0
    working_memory_bytes: int = 0
    available_memory_bytes: int | None = None
    disk: list[dict] = field(default_factory=list)
    # Per device of a CUDA or several-device merge (``preflight.device_report``).
    devices: list[dict] = field(default_factory=list)
    # Tensors of several blocks whose method makes statistics passes: how many are read once,
    # their inputs kept in memory up to ``budget_bytes`` a tensor (``engine.held``).
    read_once: dict | None = None
    # A merge by slices: the output's num_hidden_layers and where each layer comes from.
    layers: dict | None = None

    @property
    def memory_place(self) -> str:
        """Where ``working_memory_bytes`` is held: the device, or the host where the plan
        measured CUDA devices apart (``devices``)."""
        measured = any("needed_bytes" in entry for entry in self.devices)
        return "the host" if measured else self.device

    @property
    def can_run(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "can_run": self.can_run}

    def summary_lines(self) -> list[str]:
        """The human form of a plan that can run: pinned inputs, tensor groups, sizes, disk."""
        lines: list[str] = []
        for ref, commit in self.inputs.items():
            lines.append(f"{ref}: commit {commit}")
        lines += [adapter_line(ref, adapter) for ref, adapter in self.adapters.items()]
        width = max((len(group["action"]) for group in self.groups), default=0)
        for group in self.groups:
            count = f" ({group['count']})" if group["count"] > 1 else ""
            kernel = f"  [{group['kernel']}]" if group.get("kernel") else ""
            lines.append(f"  {group['action']:<{width}}  {group['tensors']}{count}{kernel}")
            if group.get("parameters"):
                lines += parameter_lines(group["parameters"], " " * (width + 6))
        if self.layers is not None:
            lines.append(f"num_hidden_layers {self.layers['count']}: {self.layers['map']}")
        lines.append(
            f"{self.method}: {self.tensors} tensors ({self.merged} merged, "
            f"{self.copied} copied) into {self.shards} shard(s), "
            f"{human_size(self.output_bytes)} out; {human_size(self.download_bytes)} to download; "
            f"peak working memory about {human_size(self.working_memory_bytes)} on "
            f"{self.memory_place} "
            "beyond the runtime"
            + (
                f" ({human_size(self.available_memory_bytes)} available)"
                if self.available_memory_bytes is not None
                else ""
            )
        )
        if self.read_once is not None:
            lines.append(read_once_line(self.read_once))
        lines += [device_line(entry) for entry in self.devices]
        for entry in self.disk:
            verb = "needs" if len(entry["holds"]) == 1 else "need"
            lines.append(
                f"disk: {' and '.join(entry['holds'])} {verb} {human_size(entry['needed_bytes'])} "
                f"on {entry['path']}, {human_size(entry['free_bytes'])} free"
            )
        return lines


def read_once_line(read_once: dict) -> str:
    """How the statistics passes read tensors of several blocks."""
    held, several = read_once["tensors"], read_once["of"]
    if held == 0:
        return (
            f"statistics passes: the {several} tensors of several blocks read again for each "
            "pass (none kept in memory)"
        )
    return (
        f"statistics passes: {held} of {several} tensors of several blocks read once, their "
        f"inputs kept in memory (up to {human_size(read_once['budget_bytes'])} a tensor); "
        f"{'the others' if held < several else 'none'} read again for each pass"
    )


def device_line(entry: dict) -> str:
    """One line on a device: what it merges, and on CUDA the memory its blocks need."""
    line = (
        f"device {entry['device']}: {entry['tensors']} tensors, "
        f"{human_size(entry['bytes'])} read and written"
    )
    if "needed_bytes" in entry:
        free = entry["free_bytes"]
        line += (
            f"; blocks of {entry['block_elements']:,} entries need about "
            f"{human_size(entry['needed_bytes'])} there"
            + ("" if free is None else f" ({human_size(free)} free)")
        )
    return line


def adapter_line(ref: str, adapter: dict) -> str:
    """One line on a model's LoRA adapter: rank, alpha, what it targets, its size."""
    targets = adapter["target_modules"]
    targets = targets if isinstance(targets, str) else ", ".join(targets)
    patterns = (
        " (per-module ranks or alphas: rank_pattern, alpha_pattern)"
        if (adapter["rank_pattern"] or adapter["alpha_pattern"])
        else ""
    )
    kind = (
        "DoRA adapter (each row rescaled to its magnitude)" if adapter["dora"] else "LoRA adapter"
    )
    return (
        f"{ref}: {kind}, r {adapter['r']}, alpha {adapter['alpha']:g}"
        f"{', rsLoRA' if adapter['rslora'] else ''}{patterns}, targets {targets or 'none'}; "
        f"{adapter['tensors']} tensors, {human_size(adapter['bytes'])}, merged in on the fly"
    )
