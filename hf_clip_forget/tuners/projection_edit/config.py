from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, fields

from peft.config import PeftConfig

from ...core.calibration import STRENGTH_FIELDS, check_calibration_record
from ...core.domains import PARADIGMS
from ...core.subspace import DEFAULT_RANK_TOLERANCE, EDIT_METHODS, check_alpha, check_nonnegative
from .registration import PEFT_TYPE, SAVED_PEFT_TYPE
from .schema import EMPTY_WHEN_NULL, LOAD_OPTIONS, check_config_values, read_config_json, refuse_load_options


#: Largest accepted CCUP weight: beyond it the closed form's float32 factors overflow (λ = 1e160 gave NaN logits),
#: and already at 1e8 the edit equals the hard projection to float32 precision.
MAX_CCUP_WEIGHT = 1e8


@dataclass
class ProjectionEditConfig(PeftConfig):
    """Configuration of a forget adapter: a closed-form edit ``W' = M W`` of a dual encoder's projection layers.

    ``M = I − α QQᵀ`` (``method="nullspace"``) removes the span ``Q`` of the forgotten classes' text embeddings
    from every output of the wrapped layer; ``method="ccup"`` solves
    ``min ‖M − I‖² + λ‖M T_f‖² + μ‖M T_r − T_r‖²`` so that retain classes ``T_r`` keep their directions. The
    adapter stores only thin ``(d, k)`` factors; nothing is trained. Build one with
    :func:`hf_clip_forget.add_forget_adapter` rather than by hand: it fills the factor ranks and the record of
    what is forgotten.

    Args:
        target_modules (`list[str]` or `str`, *optional*):
            The layers to wrap: the image-side and/or text-side layer of the model's family
            (`hf_clip_forget.families`; `visual_projection` / `text_projection` for CLIP). Defaults to the
            image side.
        exclude_modules (`list[str]` or `str`, *optional*):
            Modules not to wrap.
        method (`str`, defaults to `"nullspace"`):
            `"nullspace"` (projection onto the orthogonal complement of the forget subspace), `"ccup"`
            (projection that also keeps a retain set) or `"logit"` (image side, needs `retain_classes`: lowers only
            the forgotten classes' logits, along what separates their forget prompts from the kept cells; see
            `hf_clip_forget.core.logit_edit`).
        alpha (`float`, defaults to 1.0):
            Strength of a nullspace edit in [0, 1]: the forget component of every embedding is scaled by `1 − alpha`.
        keep_shared_direction (`bool`, defaults to `False`):
            Whether the image-side forget directions were taken orthogonal to the direction all named classes share
            (the mean of the forget and retain class embeddings), so that a forgotten class's logit falls to about
            the mean logit rather than to 0 (see `hf_clip_forget.core.shared_direction`).
        paradigm (`str`, defaults to `"global"`):
            `"global"`, `"domain"` or `"complete"` (see `hf_clip_forget.core.domains`).
        domains (`list[str]`):
            Domains the classes are forgotten in (or, for `"global"`, whose prompts joined the forget subspace).
        retain_domains (`list[str]`):
            Domains where the classes were kept.
        domain_templates (`dict[str, list[str]]`):
            The templates used for each domain.
        prototypes (`int`, defaults to 0):
            Synthesised visual prototypes per forget cell that joined the forget subspace (0: text only).
        retain_prototypes (`int`, defaults to 0):
            Prototypes per retain cell that joined the retain set.
        prototype_options (`dict`):
            Settings of the prototype synthesis (steps, seed, ...).
        ccup_lambda (`float`, defaults to 1000.0):
            CCUP weight λ ≥ 0 of the forget term; larger forgets harder.
        ccup_mu (`float`, defaults to 100.0):
            CCUP weight μ ≥ 0 of the retain term; larger keeps retain classes closer to unchanged.
        logit_mu (`float`, defaults to 10.0):
            `method="logit"`: weight μ ≥ 0 of the kept cells' prompts; larger moves the forgotten class's logit less
            on them (and on the images they stand for).
        logit_margin (`float`, defaults to 0.2):
            `method="logit"`: how far below the best other class (cosine units) the forgotten class's logit must
            fall on each of its forget prompts; larger forgets harder.
        rank_pattern (`dict[str, int]`):
            Number of forget-factor columns per target module (filled by `add_forget_adapter`; needed to create
            correctly shaped buffers before a checkpoint is loaded).
        retain_rank_pattern (`dict[str, int]`):
            Number of retain-factor columns per target module (CCUP only).
        projection_shapes (`dict[str, list[int]]`):
            `[out_features, in_features]` of each target module when the adapter was built; loading onto layers
            of another shape is refused.
        forgotten_classes (`list[str]`):
            The classes this adapter forgets (a saved adapter says what it forgets).
        expand_neighbours (`int`, defaults to `0`):
            Also forget, per forgotten class, this many whole words of the tokenizer's vocabulary nearest to it
            under the unedited text tower (other names of the class: "puppy" for "dog"), so that it cannot come back
            under them. The words found are recorded in `neighbour_names`.
        neighbour_names (`dict[str, list[str]]`):
            Forgotten class → the vocabulary words forgotten with it (filled on build; rebuilt from, not searched
            again, when the adapter is verified).
        retain_classes (`list[str]`):
            The classes named as kept: CCUP keeps them; with `keep_shared_direction` they define the shared
            direction; text-side edits keep them exactly.
        templates (`list[str]`):
            Prompt templates used to embed the class names.
        average_templates (`bool`, defaults to `True`):
            Whether the template embeddings of each class were averaged into one direction per class.
        rank_tolerance (`float`, defaults to 1e-5):
            Relative singular-value threshold below which directions were dropped from the bases.
        embedding_source (`str`, defaults to `"class_names"`):
            `"class_names"` (embedded with the model's text tower) or `"text_embeds"` (vectors given by the user).
        tokenizer_name_or_path (`str`, *optional*):
            The tokenizer peft's entry points (`get_peft_model`, `PeftModel.add_adapter`, `inject_adapter_in_model`,
            transformers' `add_adapter`) embed the class names with; default: the one saved with the model's
            checkpoint. (`add_forget_adapter` takes a tokenizer object instead.)
        mergeable (`bool`, defaults to `True`):
            Whether the edit can be merged into the weights: false when a wrapped module is not a Linear layer
            (SigLIP's image pooling head), whose output is then edited and merging is refused.
        stack (`list[str]`):
            When saved as part of a stack: the names of every adapter saved together, this one first. A stack is
            loaded whole by `ForgetPeftModel.from_pretrained`; plain peft would load only this one, so it refuses.
        factor_checksums (`dict[str, str]`):
            sha256 of each stored factor (`"<module>.forget"`, `"<module>.retain"`), recorded on save and checked
            on load, so that corrupted or altered factors are refused.
        base_fingerprints (`dict[str, dict]`):
            Fingerprint of each projection weight of the base model the adapter was built on (see
            `hf_clip_forget.core.fingerprint`); loading onto a different base is refused.
        base_model_revision (`str`, *optional*):
            Hub revision of the base model, when known.
        provenance (`dict`):
            Creation date and library versions.
        calibration (`dict`):
            How the strength was chosen, when it was (`hf_clip_forget.calibrate_forget_adapter`): the budget, every
            strength tried with its validation numbers, the chosen one (equal to this config's `alpha`, or
            `ccup_lambda`/`ccup_mu`), the accuracies before and after per class and per (domain, class) cell, and
            the validation set's size and sha256 — never its images. Empty: not calibrated (the strength was given).

    Load options (attributes, never saved — a file must not be able to switch a check off; pass them to
    `from_pretrained` / `ForgetPeftModel.from_pretrained` / `load_adapter`):

    - `verify_base_fingerprint` (default `True`): check `base_fingerprints` against the model. `False` applies an
      adapter to another base on purpose.
    - `trust_unverified` (default `False`): accept a saved adapter whose config lacks `factor_checksums` or
      `base_fingerprints` (one not saved by this library, or stripped). Its factors are then not checked against
      checksums, and its card and `verify` report say "unverified".
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Layers to wrap (the family's image and/or text layer); default: the image side."},
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules not to wrap."})
    method: str = field(default="nullspace", metadata={"help": "Edit method: 'nullspace', 'ccup' or 'logit'."})
    alpha: float = field(default=1.0, metadata={"help": "Nullspace strength in [0, 1]; 1 removes the subspace."})
    keep_shared_direction: bool = field(
        default=False,
        metadata={"help": "Image-side forget directions orthogonal to the mean direction of all named classes."},
    )
    paradigm: str = field(default="global", metadata={"help": "'global', 'domain' or 'complete'."})
    domains: list = field(default_factory=list, metadata={"help": "Domains the classes are forgotten in."})
    retain_domains: list = field(default_factory=list, metadata={"help": "Domains where the classes are kept."})
    domain_templates: dict = field(default_factory=dict, metadata={"help": "Templates used per domain."})
    prototypes: int = field(default=0, metadata={"help": "Visual prototypes per forget cell (0: text only)."})
    retain_prototypes: int = field(default=0, metadata={"help": "Visual prototypes per retain cell."})
    prototype_options: dict = field(default_factory=dict, metadata={"help": "Prototype synthesis settings."})
    ccup_lambda: float = field(default=1000.0, metadata={"help": "CCUP forget weight λ >= 0."})
    ccup_mu: float = field(default=100.0, metadata={"help": "CCUP retain weight μ >= 0."})
    logit_mu: float = field(default=10.0, metadata={"help": "method='logit': weight μ >= 0 of the kept cells."})
    logit_margin: float = field(
        default=0.2, metadata={"help": "method='logit': margin >= 0 below the best other class on forget prompts."}
    )
    rank_pattern: dict = field(
        default_factory=dict,
        metadata={"help": "Forget-factor columns per target module, e.g. {'visual_projection': 2}."},
    )
    retain_rank_pattern: dict = field(
        default_factory=dict, metadata={"help": "Retain-factor columns per target module (CCUP only)."}
    )
    projection_shapes: dict = field(
        default_factory=dict, metadata={"help": "[out_features, in_features] of each target module at build time."}
    )
    forgotten_classes: list = field(default_factory=list, metadata={"help": "Class names this adapter forgets."})
    expand_neighbours: int = field(
        default=0, metadata={"help": "Nearest vocabulary words per forgotten class to forget with it (0: none)."}
    )
    neighbour_names: dict = field(
        default_factory=dict, metadata={"help": "Forgotten class → vocabulary words forgotten with it (on build)."}
    )
    retain_classes: list = field(
        default_factory=list, metadata={"help": "Class names kept (CCUP, shared direction, text side)."}
    )
    templates: list = field(default_factory=list, metadata={"help": "Prompt templates used to embed class names."})
    average_templates: bool = field(
        default=True, metadata={"help": "Whether template embeddings were averaged per class."}
    )
    rank_tolerance: float = field(
        default=DEFAULT_RANK_TOLERANCE, metadata={"help": "Relative singular-value cut-off of the bases."}
    )
    embedding_source: str = field(
        default="class_names", metadata={"help": "'class_names' or 'text_embeds' (precomputed vectors)."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer (Hub id or directory) to embed the class names with when peft builds the adapter from "
            "this config (get_peft_model, add_adapter); default: the model's own checkpoint."
        },
    )
    mergeable: bool = field(
        default=True,
        metadata={
            "help": "Whether every wrapped layer is a Linear layer the edit can be merged into (filled on build)."
        },
    )
    stack: list = field(
        default_factory=list, metadata={"help": "Names of the adapters saved together with this one (this one first)."}
    )
    factor_checksums: dict = field(
        default_factory=dict, metadata={"help": "sha256 of each stored factor, checked when the adapter is loaded."}
    )
    base_fingerprints: dict = field(
        default_factory=dict,
        metadata={
            "help": "Fingerprint (shape, sha256, sketch) of each base projection weight the adapter was built on."
        },
    )
    base_model_revision: str | None = field(
        default=None, metadata={"help": "Hub revision (commit) of the base model, when it was loaded from the Hub."}
    )
    provenance: dict = field(
        default_factory=dict, metadata={"help": "When and with which library versions the adapter was built."}
    )
    calibration: dict = field(
        default_factory=dict,
        metadata={
            "help": "How the strength was chosen on a labelled validation set (budget, strengths tried, validation "
            "numbers, the set's size and sha256; never images); empty: not calibrated."
        },
    )
    # peft's generic code reads these two through getattr; declared so that they are explicit and validated
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Not supported (nothing trains)."})
    target_parameters: list[str] | None = field(default=None, metadata={"help": "Not supported."})

    def __post_init__(self):
        # one declared schema for every field (types, lengths, nesting) before anything reads them
        check_config_values({f.name: getattr(self, f.name) for f in fields(self)})
        for name, spec in EMPTY_WHEN_NULL.items():
            if getattr(self, name, ()) is None:
                setattr(self, name, {} if spec.expected.startswith("an object") else [])
        super().__post_init__()
        self.verify_base_fingerprint = True
        self.trust_unverified = False
        self.checked_source = None  # set by from_pretrained
        # JSON gives back the saved string; the in-memory type is always the enum member
        self.peft_type = PEFT_TYPE
        self.inference_mode = True  # nothing is trainable; the flag only steers peft's requires_grad handling
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.modules_to_save:
            raise ValueError(
                "ProjectionEditConfig is a closed-form edit with nothing to train; `modules_to_save` is not supported."
            )
        if self.target_parameters:
            raise ValueError("ProjectionEditConfig wraps modules; `target_parameters` is not supported.")
        if self.method not in EDIT_METHODS:
            raise ValueError(f"`method` must be one of {list(EDIT_METHODS)}, got {self.method!r}.")
        if self.paradigm not in PARADIGMS:
            raise ValueError(f"`paradigm` must be one of {list(PARADIGMS)}, got {self.paradigm!r}.")
        check_alpha(self.alpha)
        for name in ("ccup_lambda", "ccup_mu", "logit_mu", "logit_margin"):
            check_nonnegative(getattr(self, name), name)
            if getattr(self, name) > MAX_CCUP_WEIGHT:
                raise ValueError(
                    f"`{name}` must be at most {MAX_CCUP_WEIGHT:g} (larger weights overflow float32 and give NaN "
                    f"logits; {MAX_CCUP_WEIGHT:g} already acts as a hard constraint), got {getattr(self, name)!r}."
                )
        rtol = self.rank_tolerance
        if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0.0 < float(rtol) < 1.0:
            raise ValueError(
                f"`rank_tolerance` must be a number in (0, 1) (the relative singular value under which a direction "
                f"counts as noise; default {DEFAULT_RANK_TOLERANCE}), got {rtol!r}."
            )
        self._check_shapes_and_ranks()
        self._check_neighbours()
        self._check_calibration()
        if self.embedding_source not in ("class_names", "text_embeds"):
            raise ValueError(
                f"`embedding_source` must be 'class_names' or 'text_embeds', got {self.embedding_source!r}."
            )

    #: The config fields that set each method's strength.
    METHOD_STRENGTHS = {
        "nullspace": ("alpha",),
        "ccup": ("ccup_lambda", "ccup_mu"),
        "logit": ("logit_mu", "logit_margin"),
    }

    @property
    def strength(self) -> dict[str, float]:
        """The strength of this adapter's method, e.g. ``{"alpha": 1.0}`` or ``{"logit_mu": 10.0,
        "logit_margin": 0.2}``."""
        return {name: getattr(self, name) for name in self.METHOD_STRENGTHS[self.method]}

    def describe_strength(self) -> str:
        """``"α = 1"``, ``"CCUP μ = 30"`` or ``"logit μ = 10, margin = 0.2"``."""
        if self.method == "nullspace":
            return f"α = {self.alpha:g}"
        if self.method == "ccup":
            return f"CCUP μ = {self.ccup_mu:g}"
        return f"logit μ = {self.logit_mu:g}, margin = {self.logit_margin:g}"

    def _check_shapes_and_ranks(self) -> None:
        """Saved ranks and shapes come from untrusted files: check them before any buffer is allocated."""
        for module, shape in self.projection_shapes.items():
            if not isinstance(shape, (list, tuple)) or len(shape) != 2 or not all(_is_count(x) for x in shape):
                raise ValueError(
                    f"`projection_shapes[{module!r}]` must be [out_features, in_features], got {shape!r}."
                )
        for name, pattern in (("rank_pattern", self.rank_pattern), ("retain_rank_pattern", self.retain_rank_pattern)):
            for module, rank in pattern.items():
                if not _is_count(rank):
                    raise ValueError(f"`{name}[{module!r}]` must be an integer >= 1, got {rank!r}.")
                out_features = self.projection_shapes.get(module, [None])[0]
                if out_features is not None and rank > out_features:
                    raise ValueError(
                        f"`{name}[{module!r}]` = {rank} exceeds the layer's {out_features} output features: a factor "
                        "has at most one column per embedding dimension. The adapter config is corrupt or altered."
                    )

        if self.method == "logit" and self.rank_pattern and self.retain_rank_pattern != self.rank_pattern:
            raise ValueError(
                "A logit-constrained adapter stores one detector per dual vector (`retain_rank_pattern` equal to "
                f"`rank_pattern`), got {self.retain_rank_pattern} and {self.rank_pattern}: the adapter config is "
                "corrupt or altered."
            )

    def _check_neighbours(self) -> None:
        count = self.expand_neighbours
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"`expand_neighbours` must be an integer >= 0 (words per class), got {count!r}.")
        names = self.neighbour_names
        if not isinstance(names, dict) or not all(
            isinstance(words, list) and all(isinstance(w, str) and w.strip() for w in words)
            for words in names.values()
        ):
            raise ValueError(f"`neighbour_names` must map class names to lists of words, got {names!r}.")
        unknown = sorted(set(names) - set(self.forgotten_classes))
        if unknown:
            raise ValueError(f"`neighbour_names` names {unknown}, which are not among `forgotten_classes`.")

    def _check_calibration(self) -> None:
        """The calibration record comes from an untrusted file: check its layout, and that the strength it chose is
        this config's (a card must not claim a calibration of another strength)."""
        check_calibration_record(self.calibration, self.method)
        if self.calibration:
            configured = {name: float(getattr(self, name)) for name in STRENGTH_FIELDS[self.method]}
            if {name: float(value) for name, value in self.calibration["chosen"].items()} != configured:
                raise ValueError(
                    f"`calibration` chose {self.calibration['chosen']}, but this config's strength is {configured}: "
                    "the adapter config is corrupt or altered."
                )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **kwargs):
        """Load a saved forget adapter's config — untrusted input — and check it and its weights file before
        anything is injected (peft's ``PeftModel.from_pretrained`` and ``load_adapter`` call this).

        The file is read strictly (UTF-8 JSON, bounded size and nesting) and every field checked against one schema;
        a saved load option is refused; the config must carry its factor checksums and base fingerprints (unless
        ``trust_unverified=True``) and describe an edit that is not the identity; ``adapter_model.safetensors`` must
        hold exactly the declared float32 factors, finite and equal to their checksums (and, in a local directory,
        not be a link leaving it). Load options: ``verify_base_fingerprint`` and ``trust_unverified`` (see the class
        docs). Other keyword arguments go to ``huggingface_hub.hf_hub_download``.
        """
        from .integrity import check_saved_config, check_weights_file

        options = {name: kwargs.pop(name) for name in LOAD_OPTIONS if name in kwargs}
        hub_kwargs, _, _ = cls._split_kwargs(kwargs)
        source = os.fspath(pretrained_model_name_or_path)
        directory, local = _adapter_directory(source, subfolder, hub_kwargs)
        where = os.path.join(source, subfolder) if subfolder else source
        values = read_config_json(os.path.join(directory, "adapter_config.json"))
        refuse_load_options(values, where)
        config = cls(**_known_fields(cls, values, where))
        for name, value in options.items():
            setattr(config, name, bool(value))
        check_saved_config(config, where)
        check_weights_file(directory, config, where, local)
        # where this checked config came from (not a field: never saved), so a load that reads it again can reuse it
        config.checked_source = (source, subfolder, (hub_kwargs.get("revision") or "",))
        return config

    def forget_names(self) -> list[str]:
        """The names whose directions are forgotten: the classes, then the neighbour words found for them."""
        return [*self.forgotten_classes, *(w for words in self.neighbour_names.values() for w in words)]

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["peft_type"] = SAVED_PEFT_TYPE  # see registration.SAVED_PEFT_TYPE
        return output  # load options are attributes, not fields: never saved


def _adapter_directory(source: str, subfolder: str | None, hub_kwargs: dict) -> tuple[str, bool]:
    """``(local directory holding the adapter's files, whether it is the user's own directory)``; a Hub repo's
    config and weights are downloaded (into the Hub cache, where peft finds them again)."""
    local = os.path.join(source, subfolder) if subfolder else source
    if os.path.isdir(local):
        from .integrity import settle_interrupted_save

        settle_interrupted_save(source)
        return local, True
    from huggingface_hub import hf_hub_download

    try:
        config_path = hf_hub_download(source, "adapter_config.json", subfolder=subfolder, **hub_kwargs)
        hf_hub_download(source, "adapter_model.safetensors", subfolder=subfolder, **hub_kwargs)
    except Exception as error:  # noqa: BLE001 - what matters is what the user can do about it
        raise ValueError(f"Can't load a forget adapter from {source!r}: {error}") from error
    return os.path.dirname(config_path), False


def _known_fields(cls, values: dict, where: str) -> dict:
    """``values`` without fields this version does not know (a newer library's), with a warning, as peft does."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        warnings.warn(
            f"{where}: ignoring unknown adapter config fields {unknown} (saved by a newer version?).", stacklevel=3
        )
    return {name: value for name, value in values.items() if name in known}


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
