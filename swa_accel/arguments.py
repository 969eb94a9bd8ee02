"""`SWAArguments`: when and how weights are averaged, and the SWA phase's learning rate.

A plain dataclass that imports nothing beyond the standard library: the recipes fill it from YAML and the command
line (`swa_accel.runner.config`), a user's own loop builds it in code. Lists given as comma strings (the command
line's form) or as lists are parsed once, here, into lists of floats.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from .errors import ConfigError
from .field_types import check_field_types


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


#: Metrics `selection_metric` may name, and whether higher is better.
SELECTION_METRICS = {"nll": False, "ece": False, "accuracy": True, "f1": True}


@dataclass
class SWAArguments:
    """When and how weights are averaged, and how the LR behaves during averaging."""

    swa_method: str = _help("swa (equal weights), ema, or none (plain training).", default="swa")
    swa_start_fraction: float = _help("Start averaging after this fraction of the optimizer steps.", default=0.75)
    swa_start_epoch: Optional[int] = _help("Start averaging at this epoch (0-based); overrides the fraction.", default=None)
    swa_start_step: Optional[int] = _help("Start averaging at this optimizer step; overrides the fraction.", default=None)
    # (swa_lr, swa_start_candidates and ema_decays are typed str for the command line, where a list is a comma
    # string; __post_init__ parses them once: a float or a list of floats, 'every_N_epochs' or a list of floats.)
    swa_lr: Optional[str] = _help(
        "Constant LR of the SWA phase, as torch's SWALR: one rate for every param group, or one per group "
        "('0.05,0.01'); the anneal starts from the last rate used. None keeps the pre-SWA schedule.", default=None)
    swa_anneal_steps: Optional[int] = _help("Steps of the anneal to swa_lr; None means one epoch of steps.", default=None)
    swa_anneal_strategy: str = _help("cos or linear anneal to swa_lr.", default="cos")
    swa_update_every_steps: Optional[int] = _help("Average every N optimizer steps; None averages at each epoch end.",
                                                  default=None)
    ema_decay: float = _help("EMA decay per averaging update.", default=0.999)
    ema_warmup: bool = _help("Use min(ema_decay, (1 + n) / (10 + n)) so early EMA is not stuck at init.", default=False)
    ema_buffers: str = _help("EMA buffers: average or copy.", default="average")
    swa_start_candidates: Optional[str] = _help(
        "One run, many averages: later starts whose averages are kept beside the main one and chosen from at the "
        "end on the validation split. 'every_epoch' (each epoch from the SWA start), 'every_2_epochs' (or any N), "
        "epochs ('12,16,20') or "
        "fractions of the budget ('0.5,0.75'); the SWA start itself is always the first candidate. "
        "One averaged copy per candidate, no extra work per update.", default=None)
    ema_decays: Optional[str] = _help(
        "Side EMAs of the same averaging updates, as more candidates ('0.9,0.99'; decay per update), "
        "one fp32 copy each.", default=None)
    ema_warmup_power: Optional[float] = _help(
        "timm's EMA warmup: decay min(ema_decay, max(ema_min_decay, 1 - (1 + n / ema_warmup_gamma) ** -power)) at "
        "update n (timm's ModelEmaV3; 2/3 for long runs, 3/4 for short ones). None: ema_warmup's (1 + n) / (10 + n), "
        "or no warmup.", default=None)
    ema_warmup_gamma: float = _help("timm's EMA warmup: the update count's scale (see ema_warmup_power).", default=1.0)
    ema_min_decay: float = _help("timm's EMA warmup: the lowest decay (see ema_warmup_power).", default=0.0)
    snapshot_every: Optional[str] = _help(
        "The snapshot store: every_epoch, every_N_epochs or every_N_steps, its points. At each it writes (in the "
        "background, into output_dir/snapshots) what any average is built from after the run: windows between any "
        "two points, LAWA, post-hoc EMA of any width, BEMA. None: no store. With swa_method none the run trains, "
        "evaluates and exports as without SWA and only keeps the store, from its first step (choose_from_store "
        "builds the averages later).", default=None)
    snapshot_from: str = _help(
        "Where the store begins: swa_start (its first fold is the first averaging update) or start (from the first "
        "step, at the averaging cadence: post-hoc EMA and LAWA of the whole run).", default="swa_start")
    posthoc_ema_tracked: Optional[str] = _help(
        "The store's post-hoc EMA: the widths (sigma_rel, EDM2) of the power-function EMAs it tracks, two or more "
        "('0.05,0.1': EDM2's); one fp32 copy each. none: no post-hoc EMA.", default="0.05,0.1")
    posthoc_ema_widths: Optional[str] = _help(
        "The post-hoc EMA widths (sigma_rel) reconstructed at the end as candidates.", default="0.02,0.05,0.1,0.15,0.2")
    lawa_ks: Optional[str] = _help(
        "LAWA candidates from the store: the mean of the weights at the last k points, for each k ('1,3,5'); the "
        "store keeps the weights of the last max(k) points.", default=None)
    store_windows: Optional[str] = _help(
        "Windows of the store as candidates, in epochs: 'A-B' pairs such as '10-20,20-30', each the equal-weight "
        "mean of the folds after epoch A through epoch B (B, and A unless it is at or before the store's start, on "
        "store points). Named window_epochs_A_B.", default=None)
    bema: bool = _help("A BEMA candidate from the store (TRL's BEMACallback defaults; one fp32 copy).", default=False)
    soup: bool = _help(
        "A greedy soup (Wortsman et al. 2022) after scoring: the candidates in order of validation score, each "
        "kept in a uniform mean only if the validation score improves.", default=False)
    snapshot_disk_budget_mb: Optional[float] = _help(
        "The store's disk budget: past it the points are thinned before training (every 2nd, 3rd ...), and the "
        "run says which window starts that drops.", default=None)
    selection_metric: str = _help(
        "Validation metric that picks the exported candidate: nll or ece (lower is better), accuracy or f1 "
        "(higher is better).", default="nll")
    swa_placement: str = _help(
        "Where the fp32 average lives. auto: 'sharded' under FSDP2, else 'main'. main: one copy on the main "
        "process. sharded: every rank averages its own shards (FSDP2; under DDP each rank averages its replica).",
        default="auto")
    swa_offload_to_cpu: bool = _help("Keep the averaged copy in CPU memory.", default=False)
    average_trainable_only: bool = _help(
        "Average only the parameters that require grad (e.g. PEFT LoRA adapters over a frozen model): the average, "
        "the store and each candidate then hold those alone, and every other weight and buffer of an averaged model "
        "is the trained model's own.", default=False)
    bn_recompute_max_samples: Optional[int] = _help(
        "Training samples (all ranks together) of the BN recompute before an intermediate evaluation or "
        "checkpoint, drawn at random; precise-BN work finds 10^3 to 10^4 enough. The final export always uses "
        "a full pass. None: always full.",
        default=4096)
    bn_recompute_batch_size: Optional[int] = _help(
        "Per-process batch size of the BN recompute's forwards. They keep no gradients, so they can be as large as "
        "evaluation batches; each batch's mean and unbiased variance estimate the data's at any batch size, and "
        "larger batches need fewer forwards. None: the training batch size (what torch's update_bn over the "
        "train loader uses).", default=None)

    def __post_init__(self) -> None:
        # (The lists normalise themselves below: one value, a comma string or a YAML list.)
        check_field_types(self, skip=frozenset({"swa_lr", "swa_start_candidates", "ema_decays", "lawa_ks",
                                                "posthoc_ema_tracked", "posthoc_ema_widths"}))
        if self.swa_method not in ("swa", "ema", "none"):
            raise ConfigError(f"swa_method: must be swa, ema or none, got {self.swa_method!r}")
        if not 0.0 <= self.swa_start_fraction < 1.0:
            raise ConfigError(f"swa_start_fraction: must be in [0, 1), got {self.swa_start_fraction}")
        if self.swa_start_epoch is not None and self.swa_start_step is not None:
            raise ConfigError("swa_start_epoch: set either swa_start_epoch or swa_start_step, not both")
        for name in ("swa_start_epoch", "swa_start_step"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name}: must be >= 0, got {value}")
        self.swa_lr = _rates(self.swa_lr)
        if self.swa_anneal_steps is not None and self.swa_anneal_steps < 0:
            raise ConfigError(f"swa_anneal_steps: must be >= 0, got {self.swa_anneal_steps}")
        if self.swa_anneal_strategy not in ("cos", "linear"):
            raise ConfigError(f"swa_anneal_strategy: must be cos or linear, got {self.swa_anneal_strategy!r}")
        if self.swa_update_every_steps is not None and self.swa_update_every_steps < 1:
            raise ConfigError(f"swa_update_every_steps: must be >= 1, got {self.swa_update_every_steps}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay: must be in (0, 1), got {self.ema_decay}")
        if self.ema_buffers not in ("average", "copy"):
            raise ConfigError(f"ema_buffers: must be average or copy, got {self.ema_buffers!r}")
        self.swa_start_candidates = _start_candidates(self.swa_start_candidates)
        self.ema_decays = _floats("ema_decays", self.ema_decays, "a list of decays such as 0.9,0.99")
        for decay in self.ema_decays or ():
            if not 0.0 < decay < 1.0:
                raise ConfigError(f"ema_decays: each decay must be in (0, 1), got {decay}")
        # (With swa_method none nothing is averaged, and a config's candidates are simply unused.)
        if (self.swa_start_candidates or self.ema_decays) and self.swa_method == "ema":
            raise ConfigError(f"swa_start_candidates: candidates are averages of an SWA run; swa_method is "
                              f"{self.swa_method!r}: pass --swa_start_candidates none --ema_decays none, or "
                              "--swa_method swa")
        if self.ema_warmup_power is not None and not self.ema_warmup_power > 0:
            raise ConfigError(f"ema_warmup_power: must be > 0, got {self.ema_warmup_power}")
        if not self.ema_warmup_gamma > 0:
            raise ConfigError(f"ema_warmup_gamma: must be > 0, got {self.ema_warmup_gamma}")
        if not 0.0 <= self.ema_min_decay < 1.0:
            raise ConfigError(f"ema_min_decay: must be in [0, 1), got {self.ema_min_decay}")
        self._check_store()
        if self.selection_metric not in SELECTION_METRICS:
            raise ConfigError(f"selection_metric: must be one of {', '.join(SELECTION_METRICS)}, "
                              f"got {self.selection_metric!r}")
        if self.swa_placement not in ("auto", "main", "sharded"):
            raise ConfigError(f"swa_placement: must be auto, main or sharded, got {self.swa_placement!r}")
        if self.bn_recompute_batch_size is not None and self.bn_recompute_batch_size < 1:
            raise ConfigError(f"bn_recompute_batch_size: must be >= 1, got {self.bn_recompute_batch_size}")
        if self.bn_recompute_max_samples is not None and self.bn_recompute_max_samples < 1:
            raise ConfigError(f"bn_recompute_max_samples: must be >= 1, got {self.bn_recompute_max_samples}")

    def _check_store(self) -> None:
        if self.snapshot_every is not None and str(self.snapshot_every).lower() == "none":
            self.snapshot_every = None
        if self.snapshot_every is not None and store_cadence(self.snapshot_every) is None:
            raise ConfigError(f"snapshot_every: must be every_epoch, every_N_epochs or every_N_steps, "
                              f"got {self.snapshot_every!r}")
        if self.snapshot_from not in ("swa_start", "start"):
            raise ConfigError(f"snapshot_from: must be swa_start or start, got {self.snapshot_from!r}")
        self.posthoc_ema_tracked = _floats("posthoc_ema_tracked", _none_word(self.posthoc_ema_tracked),
                                           "a list of widths such as 0.05,0.1")
        self.posthoc_ema_widths = _floats("posthoc_ema_widths", _none_word(self.posthoc_ema_widths),
                                          "a list of widths such as 0.05,0.1,0.2")
        for name in ("posthoc_ema_tracked", "posthoc_ema_widths"):
            for width in getattr(self, name) or ():
                if not 0.0 < width <= 0.28:  # (the widest power-function profile is 0.2887)
                    raise ConfigError(f"{name}: each width (sigma_rel) must be in (0, 0.28], got {width}")
        tracked = self.posthoc_ema_tracked or []
        if len(tracked) == 1 or len(set(tracked)) != len(tracked):
            raise ConfigError(f"posthoc_ema_tracked: post-hoc EMA needs two or more different widths, got {tracked}")
        self.lawa_ks = _floats("lawa_ks", _none_word(self.lawa_ks), "a list of point counts such as 1,3,5")
        if self.lawa_ks is not None:
            if not all(k.is_integer() and k >= 1 for k in self.lawa_ks):
                raise ConfigError("lawa_ks: each k must be a whole number >= 1, got "
                                  + ",".join(f"{k:g}" for k in self.lawa_ks))
            self.lawa_ks = [int(k) for k in self.lawa_ks]
        self.store_windows = _windows(_none_word(self.store_windows))
        if self.snapshot_disk_budget_mb is not None and not self.snapshot_disk_budget_mb > 0:
            raise ConfigError(f"snapshot_disk_budget_mb: must be > 0, got {self.snapshot_disk_budget_mb}")
        if self.snapshot_every is None:
            defaults = {f.name: f.default for f in fields(self)}
            for name, used in (("lawa_ks", self.lawa_ks), ("bema", self.bema), ("store_windows", self.store_windows),
                               ("snapshot_disk_budget_mb", self.snapshot_disk_budget_mb),
                               ("snapshot_from", self.snapshot_from != "swa_start"),
                               *((name, getattr(self, name) not in (None, _floats(name, defaults[name], "")))
                                 for name in ("posthoc_ema_tracked", "posthoc_ema_widths"))):
                if used:
                    raise ConfigError(f"{name}: built from the snapshot store; set snapshot_every (e.g. every_epoch)")
        elif self.swa_method == "ema":
            raise ConfigError("snapshot_every: the store keeps the snapshots of an SWA run, or of a run without "
                              "averaging (swa_method none); swa_method is 'ema'")

    def candidate_options(self) -> list[str]:
        """The options set here that make candidates to choose among (for the line that refuses a choice)."""
        asked = {"swa_start_candidates": self.swa_start_candidates, "ema_decays": self.ema_decays,
                 "snapshot_every": self.store_enabled, "soup": self.soup}
        return [name for name, value in asked.items() if value] or ["swa_start_candidates"]

    @property
    def store_enabled(self) -> bool:
        return self.snapshot_every is not None

    @property
    def store_only(self) -> bool:
        """A run that trains without averaging (swa_method none) and keeps the snapshot store, to choose from later."""
        return not self.enabled and self.store_enabled

    def store_only_view(self) -> "SWAArguments":
        """What a store-only run records: the store of an SWA run from step 0 at the averaging cadence, with no SWA
        learning rate (the run's own schedule is untouched). Its running mean is the store's widest window."""
        view = copy.copy(self)  # (not dataclasses.replace: the lists are parsed already)
        view.swa_method, view.swa_start_step, view.swa_start_epoch, view.swa_lr = "swa", 0, None, None
        view.snapshot_from = "swa_start"
        return view

    @property
    def enabled(self) -> bool:
        return self.swa_method != "none"

    def start_candidates_spec(self) -> tuple[str, tuple[float, ...]]:
        """('none' | 'every_epoch' (values: the spacing in epochs) | 'epochs' | 'fractions', values)."""
        value = self.swa_start_candidates
        if value is None:
            return "none", ()
        if isinstance(value, str):
            return "every_epoch", (float(_every_epochs(value)),)
        if all(v.is_integer() for v in value):
            return "epochs", tuple(value)
        return "fractions", tuple(value)

    def swa_lr_values(self) -> tuple[float, ...]:
        """`swa_lr` as a tuple: one rate, or one per param group (empty when None)."""
        if self.swa_lr is None:
            return ()
        return tuple(self.swa_lr) if isinstance(self.swa_lr, list) else (self.swa_lr,)

    def ema_decay_values(self) -> tuple[float, ...]:
        return tuple(self.ema_decays or ())


def store_cadence(text: str) -> Optional[tuple[int, str]]:
    """(N, 'epochs' | 'steps') for 'every_epoch', 'every_N_epochs' or 'every_N_steps'; None for anything else."""
    epochs = _every_epochs(str(text))
    if epochs is not None:
        return epochs, "epochs"
    steps = re.fullmatch(r"every_([1-9][0-9]*)_steps", str(text))
    return (int(steps.group(1)), "steps") if steps else None


def _none_word(value: Any) -> Any:
    """'none' (any case) for a list option means an empty list."""
    return None if isinstance(value, str) and value.strip().lower() == "none" else value


def _comma_list(value: Any) -> Optional[list[str]]:
    """A YAML list, a list in code or a comma-separated string, as a list of stripped words (None when empty)."""
    if value is None:
        return None
    words = value if isinstance(value, (list, tuple)) else str(value).split(",")
    words = [str(word).strip() for word in words if str(word).strip()]
    return words or None


def _windows(value: Any) -> Optional[list[tuple[int, int]]]:
    """`store_windows` as (A, B) epoch pairs, 0 <= A < B, from 'A-B' words (or pairs already parsed)."""
    if value is not None and isinstance(value, (list, tuple)) and all(isinstance(w, (list, tuple)) for w in value):
        value = [f"{a}-{b}" for a, b in value]
    words = _comma_list(value)
    if words is None:
        return None
    windows = []
    for word in words:
        match = re.fullmatch(r"(\d+)-(\d+)", word)
        if match is None or int(match[1]) >= int(match[2]):
            raise ConfigError(f"store_windows: each window is A-B in whole epochs with A < B (e.g. 10-20,20-30), got "
                              f"{word!r}")
        windows.append((int(match[1]), int(match[2])))
    return windows


def _floats(name: str, value: Any, expected: str) -> Optional[list[float]]:
    words = _comma_list(value)
    if words is None:
        return None
    try:
        return [float(word) for word in words]
    except ValueError:
        raise ConfigError(f"{name}: must be {expected}, got {value!r}") from None


def _every_epochs(text: str) -> Optional[int]:
    """N for 'every_N_epochs' (1 for 'every_epoch'), else None."""
    if text == "every_epoch":
        return 1
    every = re.fullmatch(r"every_([1-9][0-9]*)_epochs", text)
    return int(every.group(1)) if every else None


def _start_candidates(value: Any) -> Any:
    """`swa_start_candidates` as 'every_epoch' / 'every_N_epochs', or a list of whole epochs or of fractions."""
    words = _comma_list(value)
    if words is None:
        return None
    if len(words) == 1 and _every_epochs(words[0]) is not None:
        return words[0]
    text = ",".join(words)
    try:
        values = [float(word) for word in words]
    except ValueError:
        raise ConfigError(f"swa_start_candidates: must be every_epoch, every_N_epochs or a list of epochs or "
                          f"fractions, got {text!r}") from None
    if all(v.is_integer() and v >= 0 and "." not in word for v, word in zip(values, words)):
        return values
    if all(0.0 < v < 1.0 for v in values):
        return values
    raise ConfigError(f"swa_start_candidates: list whole epochs (>= 0) or fractions in (0, 1), not a mix; "
                      f"got {text!r}")


def _rates(value: Any) -> Any:
    """`swa_lr` from the command line, YAML or code: None, one rate (a float) or one per param group (a list)."""
    rates = _floats("swa_lr", value, "a rate or a list of rates such as 0.05,0.01")
    if rates is None:
        return None
    for rate in rates:
        if not rate > 0:
            raise ConfigError(f"swa_lr: must be > 0, got {rate}")
    return rates[0] if len(rates) == 1 else rates
