"""``unf demo``: the whole library on embedded digits data, stage by stage (spec -> zoo -> predict -> align ->
generate -> optimize -> edit), with one progress bar and one result line per stage, ``results.json`` and an offline
report (``report.md``, ``report.html``, a PNG per stage) in ``--out``.

A stage that fails, or whose feature is missing, is recorded as ``{"skipped": "<reason>"}`` and the demo goes on.
"""
from __future__ import annotations

from .common import UserError, _strict, add_command, ctx, emit, info, progress, user_error, warn


def _stage_list(text: str) -> list:
    from .demo_stages import STAGES

    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise UserError(f"--only {text!r}: unknown stage {', '.join(map(repr, unknown)) or '(none given)'}; "
                        f"stages: {','.join(STAGES)}")
    return names


def register(sub) -> None:
    p = add_command(sub, "demo", run=run, seed=True, device=True,
                    help="the whole library on embedded digits data: spec, zoo, predict, align, generate, optimize, "
                         "edit; writes results.json and an offline report (report.html, report.md, PNGs)",
                    example="unf demo --out unf_demo\nunf demo --out demo_quick --quick --only predict,align")
    p.add_argument("--out", default="unf_demo", help="folder for the report, results.json and what the stages write")
    p.add_argument("--quick", action="store_true", help="tiny sizes (about a minute; what CI runs)")
    p.add_argument("--only", metavar="STAGE,...", default=None,
                   help="run these stages (and the ones they need: predict and generate need zoo); "
                        "stages: spec,zoo,predict,align,generate,optimize,edit")


def _machine() -> str:
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def run(args) -> int:
    import json
    import os
    import time
    import traceback
    from pathlib import Path

    import torch

    import unf
    from unf.io import atomic_write

    from .common import run_record
    from .demo_report import write_report
    from .demo_stages import NEEDS, SIZES, STAGES, DemoRun, ticks

    wanted = _stage_list(args.only) if args.only is not None else list(STAGES)
    chosen = {n for w in wanted for n in (w, *NEEDS.get(w, ()))}
    stages = [n for n in STAGES if n in chosen]
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {args.out}: exists and is not a directory")
    with user_error("--out", (OSError,)):  # fail before any work
        out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise UserError(f"--out {args.out}: not writable")
    size = SIZES["quick" if args.quick else "default"]
    demo = DemoRun(out=out, seed=args.seed, device=args.device, size=size)
    record = {**run_record(), "torch_version": torch.__version__, "device": str(args.device), "quick": args.quick,
              "machine": _machine(), "threads": torch.get_num_threads(), "stages": stages, "sizes": size,
              "timings": {}}
    results = {"run": record}
    start = time.perf_counter()
    for name in stages:
        missing = [n for n in NEEDS.get(name, ()) if "skipped" in results.get(n, {})]
        bar = progress(total=ticks(name, size), desc=name, unit="step", leave=False)

        def tick(text, bar=bar):
            bar.set_postfix_str(text)
            bar.update(1)

        t0 = time.perf_counter()
        if missing:
            result = {"skipped": f"needs the {missing[0]} stage, which was skipped"}
        else:
            try:
                result = STAGES[name](demo, tick)
            except Exception as e:  # a stage that fails is reported and skipped; the demo goes on
                if ctx.debug:
                    traceback.print_exc()
                result = {"skipped": f"{type(e).__name__}: {' '.join(str(e).split())}"}
        bar.close()
        record["timings"][name] = time.perf_counter() - t0
        results[name] = result
        if "skipped" in result:
            warn(f"demo stage {name} skipped: {result['skipped']}")
        else:
            info(f"{name:>8}: {result['line']} [{record['timings'][name]:.1f} s]")
        emit({"stage": name, "seconds": record["timings"][name], **result})
    record["seeds"] = {"seed": args.seed, **demo.seeds}
    record["seconds"] = time.perf_counter() - start
    with user_error("--out", (OSError,)):
        atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(
            json.dumps(_strict(results), indent=1, default=str) + "\n"))
        write_report(results, out)
    info(f"{len(stages)} stages in {record['seconds']:.0f} s; report: {out / 'report.html'} (and report.md), "
         f"numbers: {out / 'results.json'} (unf {unf.__version__})")
    return 0
