"""``hf-clip-forget calibrate``: choose the edit's strength on labelled validation images for a budget, and save the
adapter (its config and card record the calibration)."""

from __future__ import annotations

from .arguments import names_option, refuse_forgetting_every_class, split_names, templates_option, write_json
from .loading import (
    CommandError,
    check_output_path,
    command_processes,
    load_data,
    load_dual_encoder,
    require_image_classifier,
)


def add_calibrate_parser(commands) -> None:
    """The ``calibrate`` subcommand's arguments."""
    calibrate = commands.add_parser(
        "calibrate",
        help="choose the edit's strength on labelled validation images for a budget, and save that adapter",
        description="Build the forget edit of --classes from their names, try its strength (α, or μ for CCUP) on the "
        "labelled images of --data, and save the adapter with the strength that best meets the budget: at most "
        "--max-forget accuracy left on the forgotten images, at most --max-retain-drop lost on the kept ones. The "
        "data's other classes are the kept ones. Exit 0 also when the budget cannot be met (it says so; the JSON "
        'has "budget_met": false).',
    )
    calibrate.add_argument("model", help="Hub id, local path, or `demo`")
    calibrate.add_argument("--classes", required=True, help="classes to forget, comma-separated (the data's names)")
    calibrate.add_argument(
        "--retain-classes",
        default=None,
        help="classes to keep, comma-separated (default: every other class of --data)",
    )
    calibrate.add_argument("--domains", default=None, help="forget only in these domains (comma-separated)")
    calibrate.add_argument("--retain-domains", default=None, help="domains where the classes stay recognisable")
    calibrate.add_argument("--paradigm", choices=["global", "domain", "complete"], default=None,
                           help="as in `forget` (default: domain with --domains, else global)")  # fmt: skip
    calibrate.add_argument("--method", choices=["nullspace", "ccup"], default=None,
                           help="default: ccup with --domains, nullspace otherwise")  # fmt: skip
    calibrate.add_argument("--target", choices=["visual", "text", "both"], default="visual",
                           help="the projection to edit, as in `forget`: visual, text or both")  # fmt: skip
    calibrate.add_argument("--templates", nargs="+", default=None,
                           help="templates of the edit: 'imagenet', 'single' or format strings (default: as in "
                           "`forget`)")  # fmt: skip
    calibrate.add_argument("--eval-templates", nargs="+", default=None,
                           help="templates of the zero-shot classifier that judges each strength (default: the "
                           "80-template ensemble, as `eval` uses)")  # fmt: skip
    calibrate.add_argument("--data", required=True, help="labelled validation images: parquet file/folder, image "
                           "folder or Hub dataset id (never the test split you report on)")  # fmt: skip
    calibrate.add_argument("--split", default="train", help="split of --data (default: train)")
    calibrate.add_argument("--max-forget", type=float, default=0.01,
                           help="largest accuracy left on the forgotten images, a fraction (default 0.01 = 1 %%)")  # fmt: skip
    calibrate.add_argument("--max-retain-drop", type=float, default=0.01,
                           help="largest accuracy drop on the kept images, a fraction (default 0.01 = 1 point)")  # fmt: skip
    calibrate.add_argument("--alphas", default=None, help="nullspace strengths to try, comma-separated (default: "
                           "0.05, 0.10, …, 1)")  # fmt: skip
    calibrate.add_argument("--mus", default=None, help="CCUP μ values to try, comma-separated (default: 0.01 … 1e6, "
                           "two per decade)")  # fmt: skip
    calibrate.add_argument("--refine", type=int, default=3, help="rounds of refinement around the budget's boundary")
    calibrate.add_argument("--prototypes", type=int, default=0,
                           help="synthesised visual prototypes per forget cell (a fixed count; not searched)")  # fmt: skip
    calibrate.add_argument("--output", required=True, help="directory to save the adapter (with its card) to")
    calibrate.add_argument("--json", default=None, help="write the calibration report here")
    calibrate.add_argument("--plot", default=None, help="write the trade-off plot (PNG) here")
    calibrate.add_argument("--no-cache", action="store_true", help="do not reuse cached image features")
    calibrate.add_argument("--batch-size", type=int, default=64, help="images per forward pass of the vision tower")
    calibrate.set_defaults(handler=command_calibrate)


def _search(args):
    """The grid of ``--alphas``, ``--mus`` and ``--refine`` (checked before any work)."""
    from ..calibration import CalibrationSearch

    grid = {"refine": args.refine}
    for option, field in (("--alphas", "alphas"), ("--mus", "mus")):
        value = getattr(args, field)
        if value is not None:
            try:
                grid[field] = [float(part) for part in split_names(value)]
            except ValueError:
                raise CommandError(f"{option} {value!r}: give numbers, comma-separated, e.g. 0.25,0.5,1.") from None
    try:
        return CalibrationSearch.of(grid)
    except ValueError as error:
        raise CommandError(str(error).replace("`search.", "`--").replace("`--refine`", "--refine")) from None


def command_calibrate(args) -> int:
    """Calibrate, save the adapter to ``--output``, print the report; exit 0 whether or not the budget is met."""
    from ..calibration import calibrate_forget_adapter
    from ..core.calibration import CalibrationBudget

    for path, flag in ((args.json, "--json"), (args.plot, "--plot")):
        check_output_path(path, flag)
    try:
        budget = CalibrationBudget(args.max_forget, args.max_retain_drop)
    except ValueError as error:
        raise CommandError(str(error).replace("Budget `max_forget`", "--max-forget").replace(
            "Budget `max_retain_drop`", "--max-retain-drop")) from None  # fmt: skip
    search = _search(args)
    names = {
        field: names_option(args, field, "--" + field.replace("_", "-"))
        for field in ("classes", "retain_classes", "domains", "retain_domains")
    }
    command_processes("calibrate")
    model, tokenizer, image_processor = load_dual_encoder(args.model)
    require_image_classifier(model, "calibrate")
    dataset, source = load_data(args.data, args.split)
    refuse_forgetting_every_class(dataset, names["classes"], f"--classes {args.classes!r}")
    model, report = calibrate_forget_adapter(
        model,
        names.pop("classes"),
        tokenizer,
        data=dataset,
        budget=budget,
        search=search,
        image_processor=image_processor,
        **names,
        paradigm=args.paradigm,
        method=args.method,
        target=args.target,
        templates=templates_option(args.templates),
        eval_templates=templates_option(args.eval_templates),
        data_source=source,
        prototypes=args.prototypes,
        batch_size=args.batch_size,
        cache_features=not args.no_cache,
    )
    model.save_pretrained(args.output)
    print(report)
    write_json(args.json, report.to_dict())
    if args.plot:
        report.plot(args.plot)
        print(f"plot → {args.plot}")
    met = "budget met" if report.budget_met else "BUDGET NOT MET (the closest strength was saved; see above)"
    print(f"\n{met}: adapter `{report.adapter}` → {args.output}")
    return 0
