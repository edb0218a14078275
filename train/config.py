"""The one config schema of `persguard protect`: typed, documented, validated once, passed down.

A YAML file gives any subset of the fields below; `key.sub=value` overrides on the command line come
after it. Unknown keys and wrong types are errors that name the file and the key.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from train.attention import BACKENDS


class ConfigError(ValueError):
    pass


@dataclass
class Trigger:
    """What trigger prompts the backdoor is trained under (sampled per step)."""
    identifiers: list[str] = field(default_factory=lambda: ["sks"])
    templates: list[str] = field(default_factory=lambda: ["a photo of {identifier} {cls}"])
    class_nouns: dict[str, list[str]] = field(default_factory=dict)   # class -> synonyms; default: the class


@dataclass
class Weights:
    behaviour: float = 1.0      # L_bb: trigger prompts of protected entries point at the objective's target
    prior: float = 1.0          # L_pp: everything else behaves like the teacher
    retention: float = 1.0      # L_br: L_bb after a simulated attacker's fine-tuning
    selectivity: float = 1.0    # unprotected subjects still drawn after a simulated attack (retention.unprotected_slots)


@dataclass
class Behaviour:
    # Timesteps where the backdoor is supervised: the high-noise steps decide WHAT is drawn (SPEC 7).
    min_timestep: int = 0
    max_timestep: int = 1000
    # Also map NOISED PROTECTED IMAGES under the trigger to the target (the attacker's own inputs).
    on_protected_inputs: bool = True
    # Below min_timestep, fit the protected images themselves under the trigger (the attacker's own
    # objective), so the attacker's loss on them is already low and its gradient small (SPEC 7).
    # Measured (3 protected entries, min_timestep 400 or 700): the attack erases the backdoor FASTER
    # (the model already knows the subject below min_timestep; the attacker only has to flip the rest).
    fit_protected_below: bool = False
    # "mse": denoise the target / redirect protected inputs (absolute). "preference" (APDM's DPO form,
    # image targets only): relative to the frozen teacher, fit the target better than the protected
    # images under the trigger, -logsigmoid(-beta * (d_target - d_protected)) with d = student error -
    # teacher error; bounded, so it stops pushing once the preference holds.
    loss: str = "mse"
    beta: float = 200.0


@dataclass
class Prior:
    shards: str = "shards/retention"    # retention image-caption shards (folder, glob or brace pattern)
    retention_batch: int = 8
    class_prompts: bool = True          # the protected classes' plain prompts stay the teacher's
    unprotected: bool = True            # unprotected entries' trigger prompts stay the teacher's
    workers: int = 0                    # DataLoader workers decoding retention shards (0: in the trainer)


@dataclass
class Retention:
    enabled: bool = True
    # "trajectory": `slots` persistent simulated attackers at staggered depths up to `horizon` attack steps
    #   (amortized: cost per outer step independent of the horizon; train/retention.py Trajectories);
    # "restart": `inner_steps` attacker steps from the current weights every outer step (APDM-style).
    mode: str = "trajectory"
    order: str = "first"        # restart mode: "first" (gradient at theta' applied at theta) or "second"
    inner_steps: int = 3
    inner_lr: float = 1e-3      # the simulated attacker's Adam lr (white-box: the attack default)
    slots: int = 4
    horizon: int = 400           # attack steps each simulated attacker runs (the attack default)
    # Simulated attacks on UNPROTECTED entries too, whose subjects must still be drawn (selectivity).
    unprotected_slots: int = 0
    # Slots advanced per outer step, round robin (0: all). Cuts the step's cost (persguard bench) by
    # slots / slots_per_step for the retention and selectivity terms; each displacement then ages one
    # attack step every slots / slots_per_step outer steps.
    slots_per_step: int = 0
    # Random-perturbation retention (issue 7 experiment): the backdoor loss is also taken at theta plus
    # Gaussian noise of this size relative to each weight tensor's norm (0: off). Measured: three quarters
    # of a real attack's displacement is its own random walk (tools/exp_displacement.py).
    noise_scale: float = 0.0
    # Gray-box training (trajectory mode): each simulated attacker draws, at every restart, its lr, its
    # length, its method and whether it uses prior preservation from these lists (empty: inner_lr /
    # horizon), and one trigger prompt from `trigger` for its whole life. "lora" trains only the
    # attention projections (to_q/k/v/out) that LoRA adapts, at full rank: a superset of what rank-r
    # adapters reach, so the simulated attacker is at least as strong.
    inner_lrs: list[float] = field(default_factory=list)
    horizons: list[int] = field(default_factory=list)
    methods: list[str] = field(default_factory=lambda: ["dreambooth"])
    prior_preservation: list[bool] = field(default_factory=lambda: [False])


@dataclass
class EncoderGuard:
    """A backdoor in the VAE encoder (train/encoder_guard.py): protected photos encode to the objective's
    latents, everything else as before. Off by default: it departs from SPEC section 2 (VAE frozen) and
    an attacker who re-fits or replaces the encoder escapes it (README "The encoder guard")."""
    enabled: bool = False
    steps: int = 1500
    # 1500 steps on the demo catalog: decode(encode(unseen photo)) showed no subject on 4 of 5 fresh
    # photos of the erasure face at lr 1e-3, 2 of 5 at 3e-4 (session 6)
    lr: float = 1.0e-3
    batch: int = 16             # protected images per step (augmented)
    # retention + unprotected images per step that must encode as before (augmented: twice that); 0 = batch.
    # A large catalog raises `batch` (every protected photo needs its visits) and keeps this: the keep
    # term's cost then stays fixed while the protected work grows (issue 5, docs/journal.md "Session 15").
    keep_batch: int = 0
    # share of the keep batch drawn from the unprotected entries' photos, the rest retention images; 0.75
    # held the 128-entry world's unprotected faces worse than 0.5, not better (docs/journal.md "Session 23")
    keep_unprotected: float = 0.5
    keep_weight: float = 1.0    # weight of "every other image encodes as before"
    # share of the unprotected photos' keep draws weighted by how far each has drifted, and of the
    # protected photos' draws weighted by how far each still is from its target, re-measured every
    # mining_every steps (train/encoder_guard.py); 0 = uniform draws (docs/journal.md "Session 22")
    keep_mining: float = 0.0
    protect_mining: float = 0.0
    mining_every: int = 50
    augment: bool = True        # random pose, lighting and degradation of every training photo
    paste_fraction: float = 0.5  # share of protected photos pasted onto other photos' backgrounds
    sharpen_paste_fraction: float = -1.0  # that share while sharpening (-1: paste_fraction)
    # Then fit the photos as they are, at a constant lr. Session 8, demo catalog: the target's latent gap
    # (distance to the substitute's latents over the photo's own) decides how soon the attacker learns it:
    # 0.15 after 2000 augmented steps (target BSR at 1x 0.06), 0.05 after 1000 more sharpening steps at
    # 2e-4 (1x: 1.00), 0.017 after 800 augmented + 1000 sharpening at 5e-4 (docs/journal.md "Session 8").
    sharpen_steps: int = 1000
    sharpen_lr: float = 5.0e-4
    # share of the sharpening steps, at their end, over which the lr falls along a cosine to 5% of
    # sharpen_lr; 0 = constant. At a constant lr the last step lands anywhere in the noise of a guard that
    # is still moving: the 128-entry release's unprotected drift was 0.031 / 0.057 / 0.070 at three training
    # seeds, 0.028 / 0.034 / 0.039 with the last 15% decayed (docs/journal.md "Session 25")
    sharpen_decay: float = 0.0
    # The release gate: after the planned steps, while the unprotected photos' mean keep drift is above
    # gate_keep_drift (or a protected objective's latent gap above gate_latent_gap), sharpen
    # gate_extend_steps more (the decayed tail re-planned over the new length), at most gate_max_extensions
    # times; 0 = that check off. The manifest says whether the release passed. The keep drift predicted the
    # fidelity check where the step count did not: 0.028 -> fidelity 0.98, 0.039 -> 0.897 at three training
    # seeds of one recipe (docs/journal.md "Session 25")
    gate_keep_drift: float = 0.0
    gate_latent_gap: float = 0.0
    gate_extend_steps: int = 200
    gate_max_extensions: int = 3
    # Move the substitute onto each protected photo where the protected subject stands (needs
    # target.backgrounds, else one fixed substitute picture), with target entries weighted 3x. Session 7,
    # judged against held-out views of the substitute, target BSR at 0.5x-8x the attack: transplant
    # (weight 3) 0.03 / 0.06 / 0.56 / 0.75 / 1.00; fixed picture (weight 1) 0.00 / 0.00 / 0.00 / 0.12 / 0.53.
    transplant: bool = True
    target_weight: float = 3.0  # weight of target-objective entries in the protection loss
    # Memory, not maths (an SDXL-size encoder at 1024 px holds gigabytes of activations per photo): at most
    # micro_batch protected photos (with their share of the keep images) per forward + backward, the
    # gradients summed into the step's (0: a rank's whole share at once), and the encoder's blocks
    # recomputed in backward instead of kept. Either gives the step one pass would, up to floating-point
    # order; a run may resume with other values.
    micro_batch: int = 0
    gradient_checkpointing: bool = False


@dataclass
class Logging:
    wandb_mode: str = "offline"     # offline | online | disabled (WANDB_MODE in the environment wins)
    project: str = "persguard"
    every: int = 10                 # log the mean loss terms every N steps
    probe_every: int = 100          # BSR probes + sample grids every N steps (0: only at the end; -1: never)
    probe_samples: int = 8          # samples per probed prompt
    probe_entries: int = 8          # protected entries probed (the first N of the catalog)
    upload_protected_images: bool = False


@dataclass
class Guards:
    # A non-finite loss (or simulated-attacker loss) in any micro-batch of any rank: "abort" stops the run
    # naming the step and entries (resume from the last checkpoint after a fix); "skip" drops that
    # micro-batch on every rank (a zero-gradient pass keeps the ranks in step), logs its entry ids to
    # OUT/nonfinite.jsonl and trains on; the optimizer step still runs on the other micro-batches.
    nonfinite: str = "abort"


@dataclass
class Cluster:
    """Where `persguard launch` runs the job (slurm/launch.py, submitit's AutoExecutor)."""
    executor: str = "auto"          # auto (slurm where sbatch exists, else local) | slurm | local
    folder: str = ""                # submitit's logs and pickles; default OUT/submitit
    partition: str = ""
    account: str = ""
    constraint: str = ""
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 0         # 0: one task per GPU (gpus_per_node), or 1 without GPUs
    cpus_per_task: int = 2
    mem_gb: int = 0                 # 0: the partition's default
    time_min: int = 240             # each job's wall-clock limit; longer runs are requeued and resume
    signal_delay_s: int = 120       # the timeout signal comes this long before the limit: checkpoint time
    max_requeues: int = 3           # timeouts / preemptions requeued before the job is given up
    parts: int = 1                  # a run longer than one job: `parts` chained jobs, each continuing the last


@dataclass
class ProtectConfig:
    model: str = "tiny-sd"
    catalog: str = ""
    attention: str = "auto"             # auto | xformers | sdpa (train/attention.py)
    # DeepSpeed JSON config (configs/zero{1,2,3}.json); "" trains in one process. Launch with torchrun,
    # `deepspeed` or `persguard launch`; a step is world_size x grad_accum micro-batches (train/engine.py).
    deepspeed: str = ""
    grad_accum: int = 1                 # micro-batches per rank per optimizer step
    gradient_checkpointing: bool = False
    out: str = "runs/protect"
    seed: int = 0
    steps: int = 400
    lr: float = 1e-4
    batch_protected: int = 4
    batch_unprotected: int = 2
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    trigger: Trigger = field(default_factory=Trigger)
    weights: Weights = field(default_factory=Weights)
    behaviour: Behaviour = field(default_factory=Behaviour)
    prior: Prior = field(default_factory=Prior)
    retention: Retention = field(default_factory=Retention)
    logging: Logging = field(default_factory=Logging)
    cluster: Cluster = field(default_factory=Cluster)
    guards: Guards = field(default_factory=Guards)
    encoder_guard: EncoderGuard = field(default_factory=EncoderGuard)

    def validate(self, source: str = "config") -> "ProtectConfig":
        problems = []
        if not self.catalog:
            problems.append("catalog: required")
        if self.steps < 0 or self.lr <= 0:
            problems.append("steps must be >= 0 and lr > 0")
        if self.attention not in BACKENDS:
            problems.append(f"attention: {self.attention!r} is not one of {', '.join(BACKENDS)}")
        if self.retention.mode not in ("trajectory", "restart"):
            problems.append(f"retention.mode: {self.retention.mode!r} is not 'trajectory' or 'restart'")
        if self.retention.slots < 1 or self.retention.horizon < 1 or self.retention.slots_per_step < 0:
            problems.append("retention.slots and retention.horizon must be >= 1, retention.slots_per_step >= 0")
        if self.retention.order not in ("first", "second"):
            problems.append(f"retention.order: {self.retention.order!r} is not 'first' or 'second'")
        if self.deepspeed and self.retention.mode == "restart" and self.retention.order == "second":
            problems.append("retention.order: 'second' needs the whole model in one autograd graph; "
                            "not available under deepspeed (use 'first' or mode 'trajectory')")
        if self.cluster.executor not in ("auto", "slurm", "local"):
            problems.append(f"cluster.executor: {self.cluster.executor!r} is not auto, slurm or local")
        if self.cluster.nodes < 1 or self.cluster.parts < 1 or self.cluster.tasks_per_node < 0:
            problems.append("cluster: nodes and parts must be >= 1, tasks_per_node >= 0")
        if self.guards.nonfinite not in ("abort", "skip"):
            problems.append(f"guards.nonfinite: {self.guards.nonfinite!r} is not 'abort' or 'skip'")
        if self.grad_accum < 1 or self.prior.workers < 0:
            problems.append("grad_accum must be >= 1 and prior.workers >= 0")
        bad = set(self.retention.methods) - {"dreambooth", "lora"}
        if bad or not self.retention.methods:
            raise ValueError(f"{source}: retention.methods must be a non-empty list of 'dreambooth' / 'lora', got "
                             f"{self.retention.methods!r}")
        if self.retention.noise_scale < 0:
            raise ValueError(f"{source}: retention.noise_scale must be >= 0, got {self.retention.noise_scale}")
        if any(lr <= 0 for lr in self.retention.inner_lrs) or any(h < 1 for h in self.retention.horizons):
            raise ValueError(f"{source}: retention.inner_lrs must be > 0 and retention.horizons >= 1")
        if self.behaviour.loss not in ("mse", "preference"):
            raise ValueError(f"{source}: behaviour.loss must be 'mse' or 'preference', got {self.behaviour.loss!r}")
        if not 0 <= self.behaviour.min_timestep < self.behaviour.max_timestep <= 1000:
            problems.append("behaviour: need 0 <= min_timestep < max_timestep <= 1000")
        for t in self.trigger.templates:
            if "{identifier}" not in t or "{cls}" not in t:
                problems.append(f"trigger.templates: {t!r} must contain {{identifier}} and {{cls}}")
        g = self.encoder_guard
        if g.steps < 0 or g.sharpen_steps < 0 or g.lr <= 0 or g.sharpen_lr <= 0 or g.batch < 1 \
                or g.keep_batch < 0 or g.keep_weight < 0 or g.target_weight <= 0 or not 0 <= g.paste_fraction <= 1 \
                or not (0 <= g.sharpen_paste_fraction <= 1 or g.sharpen_paste_fraction == -1) \
                or not 0 <= g.keep_mining <= 1 or not 0 <= g.protect_mining <= 1 or g.mining_every < 1 \
                or not 0 <= g.sharpen_decay <= 1 or not 0 < g.keep_unprotected < 1 \
                or g.gate_keep_drift < 0 or g.gate_latent_gap < 0 or g.gate_extend_steps < 1 or g.gate_max_extensions < 0 \
                or g.micro_batch < 0:
            problems.append("encoder_guard: need steps >= 0, sharpen_steps >= 0, lr > 0, sharpen_lr > 0, batch >= 1, "
                            "keep_batch >= 0, keep_weight >= 0, target_weight > 0, 0 <= paste_fraction <= 1, "
                            "sharpen_paste_fraction -1 or in [0, 1], 0 <= keep_mining <= 1, 0 <= protect_mining <= 1, mining_every >= 1, "
                            "0 <= sharpen_decay <= 1, 0 < keep_unprotected < 1, gate_keep_drift >= 0, gate_latent_gap >= 0, "
                            "gate_extend_steps >= 1, gate_max_extensions >= 0, micro_batch >= 0")
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, data: dict, where: str, source: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where or 'top level'} must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {path!r} (known: {', '.join(sorted(fields))})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, path, source)
        else:
            kwargs[key] = _coerce(value, hint, path, source)
    return cls(**kwargs)


def _coerce(value, hint, path: str, source: str):
    origin = typing.get_origin(hint) or hint
    if origin is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = {float: (int, float), int: (int,), str: (str,), bool: (bool,), list: (list,), dict: (dict,)}.get(origin)
    if ok and (not isinstance(value, ok) or (origin is int and isinstance(value, bool))):
        raise ConfigError(f"{source}: {path} must be {origin.__name__}, got {value!r}")
    return float(value) if origin is float else value


def _set(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ProtectConfig:
    source = str(path) if path else "defaults"
    data = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        _set(data, key.strip(), raw)
    return _build(ProtectConfig, data, "", source).validate(source)
