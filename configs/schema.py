"""Types, choices and ranges of every stage's config (configs/*.yaml), checked when a config is loaded.

`data_prep.runs.config.load_config` merges defaults < file < `--set`, then validates the result against
SCHEMAS[stage], so a typo in a choice (`model.calibration=isotonc`) or an out-of-range value
(`train.epochs=-1`) fails in the first second with the key, the value, the allowed values and the
file it came from, not hours later in the last stage.

One pydantic model per YAML section; each field is one key of that section, in the YAML's order.
A new key in configs/<stage>.yaml is one new line in its section's class here, e.g.
`    min_hu: float = Field(ge=-1024.0)`; a new section is a new `Section` subclass plus one line in the
stage's class (tests/test_config_schema.py fails while a YAML key has no line here). The meaning of
each key stays documented beside its default in the YAML.

The choices below are the single list the configs accept; the modules that act on them keep their
own constants (tests/test_config_schema.py checks they agree).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictStr, model_validator

from configs.durations import parse_duration

# ---------------------------------------------------------------- choices
RECIPES = ("2.5d", "windows")                                  # detector/render.py RECIPES
NEGATIVE_SAMPLING = ("matched", "uniform")                     # detector/yolo_dataset.py NEGATIVE_SAMPLING
CACHE = ("none", "ram", "disk")                                # detector/train.py CACHE_CHOICES
OMP_WAITS = ("passive", "default")                             # detector/train.py OMP_WAIT_CHOICES
BACKENDS = ("auto", "pytorch", "onnx", "openvino")             # detector/backends.py BACKEND_CHOICES
CLASSIFIER_BACKENDS = ("auto", "pytorch", "openvino")          # detector/classifier.py load_classifier
OPTIMIZERS = ("auto", "SGD", "MuSGD", "Adam", "Adamax", "AdamW", "NAdam", "RAdam", "RMSprop")  # Ultralytics names
LEVEL_MODES = ("shared", "per_level")                          # aggregation/model.py LEVEL_MODES
CALIBRATIONS = ("sigmoid", "isotonic", "none")                 # aggregation/model.py CALIBRATION_METHODS
AREA_UNITS = ("px", "mm")                                      # aggregation/features.py AREA_UNITS
FEATURE_GROUPS = ("detector", "length", "classifier")          # aggregation/features.py FEATURE_GROUPS
SAMPLE_WEIGHTS = ("metric", "none")                            # aggregation/model.py SAMPLE_WEIGHT_CHOICES
CANDIDATE_CHOICES = ("auto", "prior", "max_score_rule", "gbm", "blend")  # aggregation/candidates.py CHOICES
SPLIT_SCHEMES = ("auto", "boxed", "holdout", "oof")            # aggregation/splits.py SCHEMES
ROI_FALLBACKS = ("body", "full")                               # detector/roi.py FALLBACKS
CROP_SOURCES = ("auto", "locator")                             # detector/vertebra_crops.py CROP_SOURCES
CROP_LABELS = ("study", "boxes_where_known")                   # detector/vertebra_crops.py LABEL_CHOICES
DECODE_MODELS = ("sizes", "runs")                              # detector/levels.py DECODE_MODELS

# ---------------------------------------------------------------- limits
N_LEVELS = 7                 # C1..C7
N_CHANNELS = 3               # rendered image channels (one window per channel for the "windows" recipe)
MAX_LEVELS_PER_POSITIVE = 6  # synth labels.levels_per_positive: probabilities of 1..6 fractured levels
MAX_PERSPECTIVE = 0.001      # Ultralytics' documented range of the perspective augmentation
MAX_DEGREES = 180.0
MAX_SPACING_DECIMALS = 10
COLOUR_MAX = 255

# ---------------------------------------------------------------- value types
Prob = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
OpenProb = Annotated[float, Field(gt=0.0, lt=1.0, allow_inf_nan=False)]
Real = Annotated[float, Field(allow_inf_nan=False)]
NonNeg = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Pos = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]
Folds = Annotated[int, Field(ge=2)]
Seed = Annotated[int, Field(ge=0)]
OptStr = StrictStr | None
StrList = list[StrictStr]


def _ordered(pair: list[float]) -> list[float]:
    if pair[0] > pair[1]:
        raise ValueError(f"a [low, high] range needs low <= high, found {pair}")
    return pair


def _not_zero(value: int) -> int:
    if value == 0:
        raise ValueError("must not be 0 (-1 = AutoBatch, or a positive batch size)")
    return value


Range = Annotated[list[Real], Field(min_length=2, max_length=2), AfterValidator(_ordered)]
PosRange = Annotated[list[NonNeg], Field(min_length=2, max_length=2), AfterValidator(_ordered)]
ProbRange = Annotated[list[Prob], Field(min_length=2, max_length=2), AfterValidator(_ordered)]
Window = Annotated[list[Real], Field(min_length=2, max_length=2)]
Windows = Annotated[list[Window], Field(min_length=N_CHANNELS, max_length=N_CHANNELS)]
LevelFractions = Annotated[list[Prob], Field(min_length=N_LEVELS, max_length=N_LEVELS)]
LevelWeights = Annotated[list[NonNeg], Field(min_length=N_LEVELS, max_length=N_LEVELS)]
Colour = Annotated[list[Annotated[int, Field(ge=0, le=COLOUR_MAX)]], Field(min_length=3, max_length=3)]
Device = StrictStr | Annotated[int, Field(ge=0)] | None
Batch = Annotated[int, Field(ge=-1), AfterValidator(_not_zero)]


class Section(BaseModel):
    """A config section: every key typed, no key beyond the YAML's (unknown keys are refused earlier)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _check_folds(section: BaseModel) -> BaseModel:
    if section.val_fold >= section.n_folds:  # type: ignore[attr-defined]
        raise ValueError(f"val_fold {section.val_fold} must be below n_folds {section.n_folds}")  # type: ignore[attr-defined]
    return section


# ---------------------------------------------------------------- detector.yaml and locator.yaml
class RenderSection(Section):
    recipe: Literal[RECIPES]  # type: ignore[valid-type]
    imgsz: PosInt             # YOLO rounds it up to a multiple of its stride (32)
    neighbour_mm: NonNeg
    window_level: Real
    window_width: Pos
    windows: Windows
    crack_channel: Annotated[int, Field(ge=0, lt=N_CHANNELS)] | None   # detector/render.py crack_channel_index
    crack_width_mm: Pos
    crack_bone_hu: Real
    crack_full_hu: Pos


class DetectorPrepareSection(Section):
    n_folds: Folds
    val_fold: Count
    seed: Seed
    background_ratio: NonNeg
    negative_share: Prob
    boxed_every: PosInt
    negative_sampling: Literal[NEGATIVE_SAMPLING]  # type: ignore[valid-type]
    matched_bins: PosInt
    matched_smooth_bins: Count
    matched_floor: Prob
    hard_candidates: PosInt
    margin_slices: Count
    min_box_px: NonNeg

    _folds = model_validator(mode="after")(_check_folds)


class TrainSection(Section):
    model: StrictStr
    epochs: PosInt
    batch: Batch
    device: Device
    fold: Count | None
    threads: Count
    omp_wait: Literal[OMP_WAITS]  # type: ignore[valid-type]
    workers: Count
    seed: Seed
    deterministic: StrictBool
    patience: Count
    optimizer: Literal[OPTIMIZERS]  # type: ignore[valid-type]
    lr0: Pos
    cos_lr: StrictBool
    warmup_epochs: NonNeg
    close_mosaic: Count
    cache: Literal[CACHE]  # type: ignore[valid-type]
    plots: StrictBool
    val: StrictBool
    degrees: Annotated[float, Field(ge=0.0, le=MAX_DEGREES)]
    translate: Prob
    scale: NonNeg
    shear: Annotated[float, Field(ge=-MAX_DEGREES, le=MAX_DEGREES)]
    perspective: Annotated[float, Field(ge=0.0, le=MAX_PERSPECTIVE)]
    fliplr: Prob
    flipud: Prob
    mosaic: Prob
    mixup: Prob
    hsv_h: Prob
    hsv_s: Prob
    hsv_v: Prob
    # Ultralytics train arguments accepted as they are (absent from the YAML: Ultralytics' default applies).
    # Add a key here (typed, default None) to let it through; keys spinefrac sets itself (data, imgsz,
    # project, name, exist_ok, pretrained, verbose) are never passed through.
    resume: StrictBool | None = None          # true with train.model = <run>/weights/last.pt continues that run
    amp: StrictBool | None = None             # mixed precision on GPU
    lrf: OpenProb | None = None               # final learning rate as a fraction of lr0
    momentum: Prob | None = None
    weight_decay: NonNeg | None = None
    warmup_momentum: Prob | None = None
    warmup_bias_lr: NonNeg | None = None
    box: NonNeg | None = None                 # loss gains
    cls: NonNeg | None = None
    dfl: NonNeg | None = None
    nbs: PosInt | None = None                 # nominal batch size of the loss normalisation
    dropout: Prob | None = None
    freeze: Count | None = None               # freeze the first this many layers when fine-tuning a .pt
    fraction: Annotated[float, Field(gt=0.0, le=1.0)] | None = None   # share of the training images used
    time: Pos | None = None                   # hours; overrides epochs
    save_period: int | None = None            # save a checkpoint every this many epochs (-1 = off)
    multi_scale: StrictBool | None = None
    rect: StrictBool | None = None
    copy_paste: Prob | None = None
    erasing: Prob | None = None
    auto_augment: OptStr = None               # classification only: "randaugment", ...; null = none


class DetectSection(Section):
    conf: Prob
    iou: Prob
    max_det: PosInt
    batch: PosInt
    prefetch: Count
    inference_threads: Count
    backend: Literal[BACKENDS]  # type: ignore[valid-type]
    overlays: StrictBool
    rebuild_every: PosInt


class OverlaysSection(Section):
    top_n: Count
    min_gap_mm: NonNeg
    zoom: bool
    zoom_margin: NonNeg
    inset_size: Count
    min_score: Prob
    max_boxes: Count
    display_size: PosInt
    window_level: Real
    window_width: Pos
    box_color: Colour
    truth_color: Colour
    roi_color: Colour
    line_thickness: PosInt
    font_scale: Pos
    sheet_columns: PosInt
    sheet_tile: PosInt
    profile_size: Annotated[list[Pos], Field(min_length=2, max_length=2)]
    profile_dpi: PosInt


class ExportSection(Section):
    dynamic: StrictBool
    batch: PosInt
    simplify: StrictBool
    opset: PosInt | None


class RoiSection(Section):
    enabled: StrictBool
    size_mm: Pos
    smooth_mm: NonNeg
    jitter_mm: NonNeg
    fallback: Literal[ROI_FALLBACKS]  # type: ignore[valid-type]
    every_k: PosInt
    body_hu: Real
    pad_hu: Real


class DetectorConfig(Section):
    roi: RoiSection
    render: RenderSection
    prepare: DetectorPrepareSection
    train: TrainSection
    detect: DetectSection
    overlays: OverlaysSection
    export: ExportSection


class LocatorPrepareSection(Section):
    every_k: PosInt
    min_area_px: Count
    keep_empty: StrictBool
    n_folds: Folds
    val_fold: Count
    seed: Seed

    _folds = model_validator(mode="after")(_check_folds)


class LocateSection(Section):
    every_k: PosInt
    iou: Prob
    max_det: PosInt


class LocatorConfig(Section):
    render: RenderSection
    prepare: LocatorPrepareSection
    train: TrainSection
    locate: LocateSection


# ---------------------------------------------------------------- classifier.yaml
class CropsSection(Section):
    slices_per_level: PosInt
    margin_mm: NonNeg
    min_size_mm: Pos
    source: Literal[CROP_SOURCES]  # type: ignore[valid-type]
    presence_threshold: Prob
    pad_hu: Real
    label: Literal[CROP_LABELS]  # type: ignore[valid-type]
    box_near_slices: Count


class ClassifierPrepareSection(Section):
    seed: Seed
    val_share: OpenProb


class ScoreSection(Section):
    top_k: PosInt
    batch: PosInt
    backend: Literal[CLASSIFIER_BACKENDS]  # type: ignore[valid-type]


class ClassifierConfig(Section):
    crops: CropsSection
    render: RenderSection
    prepare: ClassifierPrepareSection
    train: TrainSection
    score: ScoreSection


# ---------------------------------------------------------------- levels.yaml
class DecodeSection(Section):
    model: Literal[DECODE_MODELS]
    max_levels_per_slice: Annotated[int, Field(ge=1, le=N_LEVELS)]
    allow_gaps: StrictBool
    gap_penalty: NonNeg
    switch_penalty: NonNeg
    evidence_clip: Annotated[float, Field(gt=0.0, lt=0.5)]
    evidence_weight: NonNeg
    absent_weight: NonNeg
    column_weight: NonNeg
    column_absent_weight: NonNeg
    ignore_unseen: StrictBool


def _segment_names(table: dict[str, list[float]]) -> dict[str, list[float]]:
    names = {f"C{a + 1}" if a == b else f"C{a + 1}-C{b + 1}" for a in range(N_LEVELS) for b in range(a, N_LEVELS)}
    bad = sorted(set(table) - names)
    if bad:
        raise ValueError(f"unknown sets of levels {bad}: names are C<a> or C<a>-C<b> with a < b")
    return table


SegmentRow = Annotated[list[Real], Field(min_length=3, max_length=3)]


def _segment_row(row: list[float]) -> list[float]:
    if not (row[0] > 0 and row[1] > 0 and 0.0 <= row[2] <= 1.0):
        raise ValueError(f"[median mm > 0, SD of log length > 0, probability in 0..1] expected, found {row}")
    return row


class LevelsPriorSection(Section):
    learn: StrictBool
    min_studies: PosInt
    segments: Annotated[dict[str, Annotated[SegmentRow, AfterValidator(_segment_row)]],
                        AfterValidator(_segment_names)]
    scales: Annotated[list[Pos], Field(min_length=1)]
    scale_sd: NonNeg
    start_above: OpenProb
    end_below: OpenProb
    cut_mm: Pos
    max_sd: Pos


class LevelsLocateSection(Section):
    min_conf: Prob
    presence_threshold: OpenProb
    column_threshold: OpenProb


class AssignSection(Section):
    min_overlap_px: NonNeg
    presence_min: Prob


class RelativeZSection(Section):
    start: LevelFractions
    end: LevelFractions

    @model_validator(mode="after")
    def _starts_before_ends(self) -> RelativeZSection:
        bad = [f"C{i + 1}" for i, (s, e) in enumerate(zip(self.start, self.end, strict=True)) if s >= e]
        if bad:
            raise ValueError(f"start must be below end for every level; not for {', '.join(bad)}")
        return self


class LevelsConfig(Section):
    decode: DecodeSection
    prior: LevelsPriorSection
    locate: LevelsLocateSection
    assign: AssignSection
    relative_z: RelativeZSection

    @model_validator(mode="after")
    def _every_set_has_a_length(self) -> LevelsConfig:
        if self.decode.model != "sizes":
            return self
        m = self.decode.max_levels_per_slice
        need = [f"C{a + 1}" if a == b else f"C{a + 1}-C{b + 1}" for a in range(N_LEVELS)
                for b in range(a, min(N_LEVELS, a + m))]
        missing = [name for name in need if name not in self.prior.segments]
        if missing:
            raise ValueError(f"decode.model sizes with max_levels_per_slice {m} needs prior.segments for "
                             f"{', '.join(missing)}")
        return self


# ---------------------------------------------------------------- aggregation.yaml
class FeaturesSection(Section):
    min_level_weight: Prob
    top_k: PosInt
    score_thresholds: Annotated[list[Prob], Field(min_length=1)]
    run_min_score: Prob
    presence_threshold: Prob
    patient_thresholds: Annotated[list[Prob], Field(min_length=1)]
    area_unit: Literal[AREA_UNITS]  # type: ignore[valid-type]
    profile_bins: PosInt
    profile_top_k: PosInt
    groups: Annotated[list[Literal[FEATURE_GROUPS]], Field(min_length=1)]  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _top_k_within_bins(self) -> FeaturesSection:
        if self.profile_top_k > self.profile_bins:
            raise ValueError(f"profile_top_k {self.profile_top_k} must not exceed profile_bins {self.profile_bins}")
        if len(set(self.groups)) != len(self.groups):
            raise ValueError(f"groups lists a group twice: {self.groups}")
        return self


class ModelSection(Section):
    sample_weights: Literal[SAMPLE_WEIGHTS]  # type: ignore[valid-type]
    level_mode: Literal[LEVEL_MODES]  # type: ignore[valid-type]
    learning_rate: Pos
    max_iter: PosInt
    max_leaf_nodes: Annotated[int, Field(ge=2)]
    max_depth: PosInt | None
    min_samples_leaf: PosInt
    l2_regularization: NonNeg
    calibration: Literal[CALIBRATIONS]  # type: ignore[valid-type]
    calibration_folds: Folds
    patient_oof_folds: Count
    random_state: Seed
    threads: PosInt | None
    monotone: StrictBool


class CandidatesSection(Section):
    choose: Literal[CANDIDATE_CHOICES]  # type: ignore[valid-type]
    repeats: PosInt
    l2: NonNeg


class SplitsSection(Section):
    scheme: Literal[SPLIT_SCHEMES]  # type: ignore[valid-type]
    negative_fraction: Prob
    aggregator_fraction: OpenProb
    min_aggregator_positives: Count
    n_folds: Folds
    seed: Seed


class EvaluateSection(Section):
    calibration_bins: Annotated[int, Field(ge=2)]


class OperatingSection(Section):
    target_sensitivity: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
    heldout_folds: Folds


class AggregationConfig(Section):
    features: FeaturesSection
    model: ModelSection
    candidates: CandidatesSection
    splits: SplitsSection
    operating: OperatingSection
    evaluate: EvaluateSection


# ---------------------------------------------------------------- pipeline.yaml
class StageChoice(Section):
    config: OptStr
    set: StrList


class LocatorChoice(StageChoice):
    enabled: StrictBool
    reuse: OptStr = None


class ClassifierChoice(StageChoice):
    enabled: StrictBool


def _duration(value: str | float | None) -> str | float | None:
    if value is not None:
        parse_duration(str(value))     # ValueError: the reason and examples (a bare number has no unit)
    return value


class BudgetSection(Section):
    total: Annotated[StrictStr | int | float | None, AfterValidator(_duration)]   # a number is refused: no unit
    reserve: Annotated[float, Field(ge=0.0, lt=1.0, allow_inf_nan=False)]
    locator: NonNeg
    detector: Pos
    classifier: NonNeg
    min_stage_s: Pos


class DemoSection(Section):
    train_studies: Annotated[int, Field(ge=2)]
    test_studies: PosInt
    seed: Seed
    world: Annotated[StrictStr, Field(min_length=1)]
    synth_set: StrList
    detector_set: StrList
    locator_set: StrList
    levels_set: StrList
    aggregation_set: StrList
    classifier_set: StrList


class PipelineConfig(Section):
    detector: StageChoice
    locator: LocatorChoice
    levels: StageChoice
    aggregation: StageChoice
    classifier: ClassifierChoice
    budget: BudgetSection
    demo: DemoSection


# ---------------------------------------------------------------- synth.yaml
class ImageSection(Section):
    size: PosInt
    fov_mm: Annotated[list[Pos], Field(min_length=2, max_length=2), AfterValidator(_ordered)]
    spacing_decimals: Annotated[int, Field(ge=0, le=MAX_SPACING_DECIMALS)]
    centre_behind_body_mm: Real
    origin_jitter_mm: NonNeg
    table_xy_mm: Range
    circle_padding: StrictBool


class VolumeSection(Section):
    slices: PosInt
    nominal_coverage_mm: Pos
    thickness_step_mm: Pos
    z_top_mm: Range


class AnatomySection(Section):
    size_scale: PosRange
    vertebra_jitter: NonNeg
    lordosis_deg: Range
    flexion_deg: Range
    yaw_deg: Range
    roll_deg: Range
    c1_extra_tilt_deg: Range
    cancellous_hu: Range
    density_jitter: NonNeg
    low_density_prob: Prob
    low_density_factor: PosRange
    vascular_channel_prob: Prob
    vascular_width_mm: PosRange
    foramen_prob: Prob
    foramen_width_mm: PosRange
    foramen_depth_mm: PosRange
    foramen_height_mm: PosRange
    osteophyte_prob: Prob
    osteophyte_mm: PosRange
    above_c1_mm: PosRange
    below_c7_mm: PosRange
    habitus: PosRange
    neck_axes_mm: Annotated[list[Pos], Field(min_length=2, max_length=2)]
    fat_mm: PosRange


class HuSection(Section):
    air: Real
    fat: Real
    muscle: Real
    disc: Real
    vascular: Real
    cortical: Range
    cortex_mm: PosRange
    min_cortex_px: NonNeg
    trabecular_sigma: NonNeg
    trabecular_above: Real
    noise_sigma: PosRange
    blur_px: PosRange
    min_channel_px: NonNeg


KindWeights = Annotated[dict[StrictStr, NonNeg], Field(min_length=1)]


class FractureSection(Section):
    gap_mm: PosRange
    shift_mm: PosRange
    min_gap_px: NonNeg
    min_shift_px: NonNeg
    no_shift_prob: Prob
    extent_frac: ProbRange
    min_window_slices: NonNeg
    extra_line_prob: Prob
    box_margin_mm: PosRange
    pillar_share: Prob
    tp_share: Prob
    kinds_c1: KindWeights
    kinds_c2: KindWeights
    kinds_lower: KindWeights


class LabelsSection(Section):
    positive_fraction: Prob
    levels_per_positive: Annotated[list[Prob], Field(min_length=MAX_LEVELS_PER_POSITIVE,
                                                     max_length=MAX_LEVELS_PER_POSITIVE)]
    single_level_weights: LevelWeights
    contiguous_prob: Prob
    multi_level_weights: LevelWeights
    box_fraction: Prob
    segmentation_fraction: Prob


class FilesSection(Section):
    jpeg_lossless_fraction: Prob
    rle_fraction: Prob
    unsigned_fraction: Prob

    @model_validator(mode="after")
    def _fractions_fit(self) -> FilesSection:
        if self.jpeg_lossless_fraction + self.rle_fraction > 1.0:
            raise ValueError("jpeg_lossless_fraction + rle_fraction must not exceed 1")
        return self


class SynthConfig(Section):
    image: ImageSection
    volume: VolumeSection
    anatomy: AnatomySection
    hu: HuSection
    fracture: FractureSection
    labels: LabelsSection
    files: FilesSection


# ---------------------------------------------------------------- worlds.yaml
class WorldSection(Section):
    about: Annotated[StrictStr, Field(min_length=1)]
    synth_set: StrList


class WorldsConfig(Section):
    """Every named world of configs/worlds.yaml (a new world is one more line here)."""

    coarse: WorldSection
    default: WorldSection
    subtle: WorldSection


# ---------------------------------------------------------------- serve.yaml
AE_TITLE_MAX = 16            # DICOM AE titles: at most 16 characters (PS3.5 VR AE)
PORT_MAX = 65535


def _ae_title(value: str) -> str:
    if not value.strip() or "\\" in value or not value.isprintable():
        raise ValueError("an AE title needs 1-16 printable characters without a backslash")
    return value


AeTitle = Annotated[StrictStr, Field(min_length=1, max_length=AE_TITLE_MAX), AfterValidator(_ae_title)]
Port = Annotated[int, Field(ge=0, le=PORT_MAX)]


class NodeSection(Section):
    ae_title: AeTitle
    host: Annotated[StrictStr, Field(min_length=1)]
    port: Port
    require_called_ae_title: StrictBool
    allowed_calling_ae_titles: list[AeTitle]
    max_associations: PosInt
    network_timeout_s: Pos
    dimse_timeout_s: Pos


class ServePathsSection(Section):
    spool: OptStr
    out: OptStr
    model: OptStr


class ServeWorkerSection(Section):
    quiet_seconds: NonNeg
    poll_seconds: Pos
    workers: PosInt
    device: OptStr
    max_spool_studies: Count
    min_free_mb: Count


class DestinationSection(Section):
    ae_title: AeTitle | None
    host: Annotated[StrictStr, Field(min_length=1)] | None
    port: Annotated[int, Field(ge=1, le=PORT_MAX)] | None
    timeout_s: Pos
    tries: PosInt

    @model_validator(mode="after")
    def _all_or_none(self) -> DestinationSection:
        given = [name for name in ("ae_title", "host", "port") if getattr(self, name) is not None]
        if given and len(given) < 3:
            missing = [name for name in ("ae_title", "host", "port") if name not in given]
            raise ValueError(f"a destination needs ae_title, host and port (or none of them); "
                             f"missing: {', '.join(missing)}")
        return self


class ServeConfig(Section):
    node: NodeSection
    paths: ServePathsSection
    worker: ServeWorkerSection
    destination: DestinationSection


SCHEMAS: dict[str, type[Section]] = {
    "detector": DetectorConfig,
    "locator": LocatorConfig,
    "levels": LevelsConfig,
    "classifier": ClassifierConfig,
    "aggregation": AggregationConfig,
    "pipeline": PipelineConfig,
    "synth": SynthConfig,
    "worlds": WorldsConfig,
    "serve": ServeConfig,
}
"""The schema of each stage's config, by stage name (configs/<stage>.yaml)."""


def passthrough_keys(stage: str, section: str) -> frozenset[str]:
    """Return the keys of `stage`'s `section` that the schema accepts although the YAML has no default."""
    schema = SCHEMAS.get(stage)
    field = schema.model_fields.get(section) if schema is not None else None
    model = field.annotation if field is not None else None
    if not (isinstance(model, type) and issubclass(model, Section)):
        return frozenset()
    return frozenset(name for name, f in model.model_fields.items() if not f.is_required())
