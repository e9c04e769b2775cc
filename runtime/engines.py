"""An engines folder, opened and checked: manifest, model config, sampler and the schedule to run.

Validation of files and hashes is `export.manifest.load_manifest` (json + hashlib only); this
module adds what the runtime needs on top: every graph the stitching loop calls is there with
the inputs and outputs it feeds, and the schedule fits the exported model and sampler.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from soda.errors import UserError
from soda.models.config import ModelConfig
from soda.sampling import SamplerConfig
from soda.schedule import Schedule

# The artefact interface (export writes, runtime reads) is the architecture's declaration,
# soda.models.interface.Interface: graph names and their input/output names come from it.


@dataclass(frozen=True)
class Engines:
    """A validated engines folder: what the backends open and what `run` checks schedules against."""

    folder: Path
    manifest: object  # export.manifest.Manifest
    config: ModelConfig
    sampler: SamplerConfig
    modules: tuple[str, ...]
    exported_schedule: Schedule

    @property
    def weights(self) -> str:
        return self.manifest.weights

    @property
    def random_init(self) -> bool:
        return str(self.weights).startswith("random-init")

    @property
    def interface(self):
        return self.config.interface

    def null_caption(self):
        """The learned null caption exported with a text model (hashed with the folder), or None."""
        name = self.manifest.data.get("null_caption")
        if not name:
            return None
        import numpy as np

        if name not in self.manifest.data["files"]:
            raise UserError(f"{self.folder}: {name} is not among the hashed files; re-run `cli.py export`")
        return np.load(self.folder / name, allow_pickle=False)

    @property
    def specs(self):
        return tuple(self.interface.spec(m) for m in self.modules)

    def graph_names(self) -> list[str]:
        names = ["condition"] if self.interface.prepared else []
        names.append("embed")
        for l in range(self.config.depth):
            names.append(f"modulation.{l}")
            names += [f"{m}.{l}" for m in self.modules]
        return names + ["final"]

    def block_graphs(self) -> list:
        """The exported block and step graphs (`soda.blocks.Block`); none in a folder made before them."""
        from soda.blocks import parse_name

        section = self.manifest.data.get("blocks") or {}
        return [parse_name(n) for n in section.get("graphs", [])]

    def path(self, name: str) -> Path:
        return self.manifest.path(name)

    def io(self, name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The (inputs, outputs) the runtime feeds and reads for graph `name`."""
        iface = self.interface
        if name == "condition":
            return iface.condition_reads, iface.condition_outputs(self.config.depth)
        if name == "embed":
            return ("x", "t", *iface.embed_context), ("tokens", *iface.step)
        if name == "final":
            return ("tokens", *iface.final_step), ("out",)
        kind = name.split(".")[0]
        if kind in ("block", "step"):
            from soda.blocks import parse_name

            return parse_name(name).io(iface)
        if kind == "modulation":
            return iface.modulation_reads, iface.modulation_outputs()
        spec = iface.spec(kind)
        return spec.inputs, spec.outputs

    def at_video(self, height: int | None = None, width: int | None = None, num_frames: int | None = None,
                 fps: float | None = None) -> "Engines":
        """The engines for another video (a video model's graphs take its size as dynamic axes):
        the config and sampler at that size; unset flags keep the exported video's."""
        if all(v is None for v in (height, width, num_frames, fps)):
            return self
        if self.config.frames is None or self.sampler.video is None:
            raise UserError(f"--height, --width, --num-frames and --fps are for video models; {self.config.name} "
                            "is an image model")
        from soda.models.video import DEFAULT_VIDEO, OFFICIAL_VIDEO, resolve_video

        h, w, f, seen = self.sampler.video
        fps0 = seen if f > 1 else DEFAULT_VIDEO.get(self.config.name, OFFICIAL_VIDEO)[3]  # an image's 120 is not a rate
        config, video = resolve_video(self.config, height, width, num_frames, fps, default=(h, w, f, fps0))
        return replace(self, config=config, sampler=replace(self.sampler, video=video))

    @property
    def exported_video(self) -> bool:
        """Whether the config is the exported one (a video model may run at another size)."""
        return self.config.hash() == self.manifest.model_hash

    def sampler_with(self, kind: str | None = None, steps: int | None = None,
                     cfg_scale: float | None = None) -> SamplerConfig:
        """The exported sampler with any of its fields overridden from the command line."""
        changes = {k: v for k, v in (("kind", kind), ("steps", steps), ("cfg_scale", cfg_scale)) if v is not None}
        return replace(self.sampler, **changes)


def open_engines(folder: str | Path, verify: str = "sha256") -> Engines:
    """Validate `folder` (files, hashes, graph interface) and read what the runtime needs."""
    from export.manifest import load_manifest

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"engines folder not found: {folder} (make one with `cli.py export --out {folder}`)")
    manifest = load_manifest(folder, verify=verify)
    try:
        config = ModelConfig.from_dict(manifest.model)
        sampler = SamplerConfig(**manifest.sampler)
    except TypeError as e:
        raise UserError(f"{folder}/manifest.json has a malformed model or sampler entry ({e})") from None
    if config.hash() != manifest.model_hash:
        raise UserError(f"{folder}/manifest.json: model config hashes to {config.hash()}, "
                        f"not the recorded {manifest.model_hash}; re-run `cli.py export`")
    schedule = Schedule.load(manifest.schedule_path)
    if schedule.hash() != manifest.schedule_hash:
        raise UserError(f"{manifest.schedule_path} hashes to {schedule.hash()}, not the manifest's "
                        f"{manifest.schedule_hash}; re-run `cli.py export`")
    schedule.check_fits(config.name, config.hash(), schedule.sampler, schedule.num_steps)
    if manifest.token_counts != schedule.token_counts(config.num_tokens):
        raise UserError(f"{folder}/manifest.json lists token counts {manifest.token_counts}, its schedule runs "
                        f"{schedule.token_counts(config.num_tokens)}; re-run `cli.py export`")
    engines = Engines(folder, manifest, config, sampler, tuple(schedule.modules), schedule)
    _check_interface(engines)
    return engines


def _check_interface(engines: Engines) -> None:
    """Every graph the loop calls is exported, with the input and output names it uses."""
    from soda.blocks import FORMAT, READABLE_FORMATS

    section = engines.manifest.data.get("blocks")
    if section is not None and (not isinstance(section, dict) or section.get("format") not in READABLE_FORMATS
                                or not isinstance(section.get("graphs"), list)
                                or None in [b for b in engines.block_graphs()]):
        raise UserError(f"{engines.folder}/manifest.json has a block-graph section this version cannot read "
                        f"(format {FORMAT} expected); re-run `cli.py export`")
    for name in engines.graph_names() + [b.name for b in engines.block_graphs()]:
        if name not in engines.manifest.artefacts:
            raise UserError(f"{engines.folder} lacks graph {name!r} (a partial export?); re-run `cli.py export`")
        art = engines.manifest.artefacts[name]
        want_in, want_out = engines.io(name)
        if tuple(art.input_names) != want_in or tuple(art.output_names[:len(want_out)]) != want_out:
            raise UserError(f"{engines.folder}: graph {name} has inputs {art.input_names} and outputs "
                            f"{art.output_names}, the runtime expects {list(want_in)} -> {list(want_out)}")


def resolve_schedule(engines: Engines, sampler: SamplerConfig, policy: str | None = None,
                     schedule_file: str | Path | None = None, speedup: float | None = None,
                     toca_official_loop: bool = False) -> Schedule:
    """The schedule `run` executes: a file, a baseline made here without torch, or the exported one.

    `--policy soda` (and no policy at all) means the schedule exported with the engines: SODA
    needs a sensitivity profile from the torch model, so it is fixed at export time. The exported
    schedule runs as it is at the exported sampler, steps and video; asked for others (`--steps`,
    `--sampler`, a video's size), an exported baseline is remade there from its policy and target
    speedup (as `sample` would make it), and an exported SODA plan is refused in one line (it was
    planned from a profile of the exported sampler and video).
    """
    from soda.policies import PROFILED, ScheduleSpec

    config = engines.config
    if toca_official_loop and policy != "toca":
        raise UserError(f"--toca-official-loop applies to --policy toca, not {policy or 'the exported schedule'}")
    if schedule_file is not None:
        if policy is not None:
            raise UserError("give --policy or --schedule, not both")
        schedule = Schedule.load(schedule_file)
    elif policy is None or policy in PROFILED:
        schedule = engines.exported_schedule
        if policy is not None and schedule.policy != policy:
            raise UserError(f"{engines.folder} was exported with a {schedule.policy!r} schedule, not a {policy} one; "
                            f"re-export with `cli.py export --policy {policy}` or pick another --policy")
        if speedup is not None:
            raise UserError("--speedup does not apply to the exported schedule (SODA's is fixed at export); "
                            "re-export with `cli.py export --speedup X`")
        same_sampler = (schedule.sampler, schedule.num_steps) == (sampler.kind, sampler.steps)
        if not engines.exported_video and schedule.policy in PROFILED:
            h, w, f, _ = engines.manifest.sampler["video"]
            raise UserError(f"{engines.folder}'s {schedule.policy} schedule was planned from a profile of the exported "
                            f"video ({h}x{w}, {f} frames); at another size give --policy full, fora, toca, duca or "
                            "taylorseer, or --schedule FILE made for that size (`cli.py profile` and `schedule`)")
        if not same_sampler and schedule.policy in PROFILED:
            raise UserError(f"{engines.folder}'s {schedule.policy} schedule was planned for {schedule.sampler}-"
                            f"{schedule.num_steps} (from a profile of that sampler), not {sampler.kind}-{sampler.steps}; "
                            f"re-export with `cli.py export --steps {sampler.steps}`, or give --policy full, fora, toca, "
                            "duca or taylorseer, or --schedule FILE made for it (`cli.py profile` and `schedule`)")
        if not (engines.exported_video and same_sampler):
            schedule = _remade_baseline(engines, schedule, sampler)
    else:
        from soda.policies import baseline_schedule

        spec = ScheduleSpec.for_model(config, sampler.kind, sampler.steps, engines.modules)
        schedule = baseline_schedule(policy, spec, config, speedup, toca_official_loop)
    schedule.check_fits(config.name, config.hash(), sampler.kind, sampler.steps)
    if tuple(schedule.modules) != engines.modules or schedule.num_layers != config.depth:
        raise UserError(f"schedule is for {schedule.num_layers} layers x {schedule.modules}, the engines have "
                        f"{config.depth} x {list(engines.modules)}")
    return schedule


def _remade_baseline(engines: Engines, schedule: Schedule, sampler: SamplerConfig) -> Schedule:
    """The exported baseline's policy and target speedup, made for `sampler` at the engines' video
    (a baseline needs no profile). Only a schedule that is that policy's at that target (remade at
    the exported sampler and video it is the same) is remade: a --schedule file or tuned setting
    exported under a baseline's name would silently become another schedule, so it is refused."""
    from soda.policies import ScheduleSpec, baseline_schedule

    target = schedule.params.get("target_speedup")
    exported = ModelConfig.from_dict(engines.manifest.model)
    again = baseline_schedule(schedule.policy, ScheduleSpec.for_model(exported, schedule.sampler, schedule.num_steps,
                                                                      engines.modules), exported, target)
    if again.hash() != schedule.hash():
        raise UserError(f"{engines.folder}'s exported {schedule.policy} schedule is not {schedule.policy}'s own "
                        f"setting{f' at {target:g}x' if target else ''} (a --schedule file or a tuned one?), so it "
                        f"cannot be remade for {sampler.kind}-{sampler.steps} at this video; give --policy or "
                        "--schedule FILE made for it")
    config = engines.config
    return baseline_schedule(schedule.policy, ScheduleSpec.for_model(config, sampler.kind, sampler.steps,
                                                                     engines.modules), config, target)


class GraphBackend:
    """The executor's Backend protocol over exported graphs; subclasses only say how to run one.

    `_run(name, inputs)` feeds the graph's inputs in manifest order and returns its outputs
    (numpy arrays) in manifest order. Which inputs each graph takes comes from the
    architecture's interface; nothing here names a model. `blocks` lists the block graphs the
    executor may call (`soda.blocks`; empty: module by module).
    """

    engines: Engines
    modules: tuple[str, ...]
    num_layers: int
    blocks: tuple = ()

    def _run(self, name: str, inputs: tuple) -> list:
        raise NotImplementedError

    def _setup_interface(self) -> None:
        self.interface = self.engines.interface
        self.specs = self.engines.specs
        self._spec = {s.name: s for s in self.specs}
        self._named_io: dict[str, tuple] = {}  # block/step graph -> its (inputs, outputs): engines.io parses names

    def prepare(self, cond):
        """The per-generation context. The conditioning is put where the backend's arrays live
        (`self.arrays`, runtime.device) once here: on a GPU a pageable upload per module call
        (the caption mask of every cross-attention) would synchronise the stream each time."""
        iface = self.interface
        arrays = getattr(self, "arrays", None)
        if arrays is not None:
            cond = {k: arrays.put(v, getattr(v, "dtype", None)) for k, v in cond.items()}
        if not iface.prepared:
            return dict(cond)
        outs = self._run("condition", tuple(_feed(n, cond[n]) for n in iface.condition_reads))
        return {**cond, **dict(zip(iface.condition_outputs(self.num_layers), outs))}

    def embed(self, x, t, context):
        iface = self.interface
        outs = self._run("embed", (x, t, *(_feed(n, context[n]) for n in iface.embed_context)))
        return outs[0], tuple(outs[1:1 + len(iface.step)])

    def modulation(self, layer, step):
        given = dict(zip(self.interface.step, step))
        outs = self._run(f"modulation.{layer}", tuple(given[n] for n in self.interface.modulation_reads))
        mods, i = {}, 0
        for spec in self.specs:
            args = tuple(outs[i:i + len(spec.args)])
            i += len(spec.args)
            gate = None
            if spec.gated:
                gate, i = outs[i], i + 1
            mods[spec.name] = (args, gate)
        return mods

    def module(self, layer, name, tokens, *args, context=None):
        spec = self._spec[name]
        ctx = tuple(_feed(n, v) for n, v in zip(spec.context, spec.context_for(context, layer)))
        outs = self._run(f"{name}.{layer}", (tokens, *args, *ctx))
        return outs[0], (outs[1] if len(outs) > 1 else None)

    def block(self, block, tokens, step, feeds: dict, context: dict) -> dict:
        """Run block graph `block` (`soda.blocks.Block`): `feeds` holds its given D, caches and
        indices by name, the context its conditioning; returns every output by name."""
        # Only the step entries modulation reads: a video's step "grid" must not stand in for the
        # conditioning's "grid" the attention reads (a context input of the same name).
        given = {"tokens": tokens, **{n: v for n, v in zip(self.interface.step, step)
                                      if n in self.interface.modulation_reads}, **feeds}
        return self._run_named(block.name, given, context)

    def step_graph(self, block, x, t, feeds: dict, context: dict) -> dict:
        """Run step graph `block` (`soda.blocks.Block` with `step`): a whole step from the latents
        and timesteps; returns every output by name ("out": the model output)."""
        return self._run_named(block.name, {"x": x, "t": t, **feeds}, context)

    def _run_named(self, name: str, given: dict, context: dict) -> dict:
        io = self._named_io.get(name)
        if io is None:
            io = self._named_io[name] = self.engines.io(name)
        ins, outs = io
        values = self._run(name, tuple(given[n] if n in given else _feed(n, context[n]) for n in ins))
        return dict(zip(outs, values))

    def final(self, tokens, step):
        iface = self.interface
        given = dict(zip(iface.step, step))
        return self._run("final", (tokens, *(given[n] for n in iface.final_step)))[0]


def _feed(name: str, value):
    """Conditioning arrays in the graphs' dtypes (masks are float32 there)."""
    import numpy as np

    return value.astype(np.float32, copy=False) if name == "mask" else value
