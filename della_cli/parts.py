"""A merge split into parts that separate processes or machines compute (``--part i/N``).

A part is a run of consecutive output shards. Shards are the unit because a shard is a file of
its own with its own digest: parts never write the same file, and the shards they write are
exactly the ones a merge on one machine writes (every random draw depends only on the seed, the
tensor, the expert and the element; see ``methods.randomness``), so any split gives the same
bytes. Parts are balanced by cost, the bytes a shard's tensors read from the inputs plus the
bytes it writes: reading dominates a merge, and the bytes read grow with the number of models
that take part in each tensor, as the arithmetic does.

Everything here comes from the plan and the models' headers: which weight files of each model a
part reads (a Hub part downloads only those), how many bytes it reads, downloads and writes, and
its peak working memory.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

from della_cli.errors import UsageError
from della_cli.io.dtypes import itemsize
from della_cli.io.reader import ModelReader
from della_cli.plan import BASE, Plan, Source, TensorJob

_PART = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Part:
    """One part of a merge: shards ``first_shard`` to ``stop_shard`` (excluded), which are
    the plan's jobs ``first_job`` to ``stop_job``, and what computing them takes."""

    number: int  # 1 to count
    count: int
    first_shard: int
    stop_shard: int
    first_job: int
    stop_job: int
    read_bytes: int
    output_bytes: int
    download_bytes: int  # the Hub weight files it reads, in full
    working_memory_bytes: int
    files: Mapping[int, frozenset[str]]  # model (BASE or expert index) -> weight files read

    @property
    def label(self) -> str:
        return f"{self.number}/{self.count}"

    @property
    def shards(self) -> range:
        return range(self.first_shard, self.stop_shard)

    @property
    def disk_bytes(self) -> int:
        """What it needs on disk: its shards, and the Hub files it downloads."""
        return self.output_bytes + self.download_bytes

    def to_dict(self) -> dict:
        return {
            "part": self.label,
            "shards": [self.first_shard + 1, self.stop_shard] if self.stop_shard else [],
            "tensors": self.stop_job - self.first_job,
            "download_bytes": self.download_bytes,
            "read_bytes": self.read_bytes,
            "output_bytes": self.output_bytes,
            "working_memory_bytes": self.working_memory_bytes,
            "disk_bytes": self.disk_bytes,
        }


def parse_part(text: str) -> tuple[int, int]:
    """``"2/8"`` -> (2, 8): part 2 of 8, counted from 1 (SLURM's ``--array=1-8``)."""
    match = _PART.match(text)
    if match is None:
        raise UsageError(f"--part: expected I/N such as 2/8, got '{text}'")
    number, count = int(match[1]), int(match[2])
    if count < 1 or not 1 <= number <= count:
        raise UsageError(f"--part: the part must be 1 to N, with N at least 1; got '{text}'")
    return number, count


def check_part_count(count: int) -> None:
    if count < 1:
        raise UsageError(f"--parts: must be at least 1, got {count}")


def split_parts(
    plan: Plan,
    readers: Mapping[int, ModelReader],
    count: int,
    hub_models: set[int],
    block_elements: int,
    whole_tensor_selection: bool,
) -> list[Part]:
    """The plan's shards in ``count`` parts of consecutive shards, balanced by cost. With more
    parts than shards, some parts are empty (they compute nothing and succeed).
    ``readers``: each model by index (BASE for the base); ``hub_models``: the indexes of
    those that come from the Hub, whose files a part downloads."""
    check_part_count(count)
    starts = shard_job_starts(plan)
    costs = [
        sum(_read_bytes(job, readers) + _out_bytes(job) for job in plan.jobs[a:b])
        for a, b in itertools.pairwise(starts)
    ]
    bounds = balanced_bounds(costs, count)
    sizes = {model: file_sizes(reader) for model, reader in readers.items()}
    parts = []
    for number, (first, stop) in enumerate(itertools.pairwise(bounds), start=1):
        jobs = plan.jobs[starts[first] : starts[stop]]
        files = files_read(jobs, readers)
        download = sum(
            sizes[model][name]
            for model, names in files.items()
            if model in hub_models
            for name in names
        )
        memory = replace(plan, jobs=jobs).working_memory_bytes(
            block_elements, whole_tensor_selection
        )
        parts.append(
            Part(
                number=number,
                count=count,
                first_shard=first,
                stop_shard=stop,
                first_job=starts[first],
                stop_job=starts[stop],
                read_bytes=sum(_read_bytes(job, readers) for job in jobs),
                output_bytes=sum(t.nbytes for shard in plan.shards[first:stop] for t in shard),
                download_bytes=download,
                working_memory_bytes=memory if jobs else 0,
                files=files,
            )
        )
    return parts


def shard_job_starts(plan: Plan) -> list[int]:
    """Where each shard's jobs start in the plan (jobs follow the shards' order), and the end.
    A shard may hold tensors that are no job of their own: an FP8 output's scales, written
    beside their weight's (``quant.requantize``); an MXFP4 output's blocks take the place of
    their job."""
    jobs = {
        job.requantize.values_name(job.name) if job.requantize else job.name for job in plan.jobs
    }
    starts = [0]
    for shard in plan.shards:
        starts.append(starts[-1] + sum(tensor.name in jobs for tensor in shard))
    return starts


def balanced_bounds(costs: list[int], count: int) -> list[int]:
    """``count + 1`` shard boundaries, each cut where the running cost comes closest to its
    share of the total; a split that depends on the costs alone, so every machine that plans
    the same merge makes the same parts."""
    running = [0]
    for cost in costs:
        running.append(running[-1] + cost)
    total = running[-1]
    bounds = [0]
    for cut in range(1, count):
        target = total * cut / count
        index = bisect.bisect_left(running, target)
        if index > 0 and target - running[index - 1] < running[index] - target:
            index -= 1
        bounds.append(min(max(index, bounds[-1]), len(costs)))
    bounds.append(len(costs))
    return bounds


def file_sizes(reader: ModelReader) -> dict[str, int]:
    """Each weight file's size as its header gives it: where its last tensor ends."""
    sizes: dict[str, int] = {}
    for info in reader.tensors.values():
        name = info.path.name
        sizes[name] = max(sizes.get(name, 0), info.offset + info.nbytes)
    return sizes


def _sources(job: TensorJob) -> Iterator[Source]:
    """Every input a job reads: its reference, each expert, and the rows that fill them."""
    for source in (job.reference, *job.experts):
        while source is not None:
            yield source
            source = source.fill


def _read_bytes(job: TensorJob, readers: Mapping[int, ModelReader]) -> int:
    return sum(
        readers[source.model].tensors[source.tensor].nbytes
        for source in _sources(job)
        if source.tensor in readers[source.model].tensors
    )


def _out_bytes(job: TensorJob) -> int:
    return job.numel * itemsize(job.out_dtype)


def files_read(jobs: list[TensorJob], readers: Mapping[int, ModelReader]) -> dict[int, frozenset]:
    """The weight files, by model, that hold the tensors ``jobs`` read."""
    files: dict[int, set[str]] = {}
    for job in jobs:
        for source in _sources(job):
            info = readers[source.model].tensors.get(source.tensor)
            if info is not None:
                files.setdefault(source.model, set()).add(info.path.name)
    return {model: frozenset(names) for model, names in sorted(files.items())}


def model_readers(base: ModelReader | None, experts: list[ModelReader]) -> dict[int, ModelReader]:
    """The models by the index a ``Source`` gives them."""
    readers = {index: reader for index, reader in enumerate(experts)}
    if base is not None:
        readers[BASE] = base
    return readers
