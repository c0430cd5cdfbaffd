"""The ``mlflow-tunix`` command line: a thin shell over the pipeline's stages.

Commands parse their arguments, call one function, and turn a :class:`~mlflow_tunix.errors.TunixError`
into one line on stderr and exit code 2. Heavy imports (jax, mlflow) happen inside the commands, so
``--help`` is instant.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import click

from mlflow_tunix import projects
from mlflow_tunix.errors import ResumableError, TunixError

EXIT_BAD_INPUT = 2


def _resume_command(run_id: str) -> str:
    """How to continue run ``run_id`` with the command being run (run or train)."""
    return f"mlflow-tunix {click.get_current_context().info_name} --resume {run_id}"


def _one_line_errors(fn):
    """Show a TunixError as ``error: <message>`` (one line) and exit 2, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TunixError as exc:
            message = " ".join(str(exc).split())
            if isinstance(exc, ResumableError):
                message += f". {exc.then} continue with: {_resume_command(exc.run_id)}{exc.note}"
            click.echo(f"error: {message}", err=True)
            sys.exit(EXIT_BAD_INPUT)

    return wrapper


class _WholeNumber(click.ParamType):
    """An integer that MLproject may pass as a float ("300.0")."""

    name = "integer"

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a whole number", param, ctx)
        if not number.is_integer():
            self.fail(f"{value!r} is not a whole number", param, ctx)
        return int(number)


WHOLE = _WholeNumber()


def _opt(value):
    """MLproject passes '' (and numeric 0) for 'not given'."""
    return None if value in ("", None) else value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlflow-tunix")
def main():
    """Train, evaluate, log and rank JAX reasoning models in MLflow.

    The tracking store is MLflow's: set MLFLOW_TRACKING_URI (default sqlite:///mlflow.db in the
    current directory). Start with `mlflow-tunix run` and look at the result with `mlflow ui`.
    """


# --------------------------------------------------------------------------- the job
def _project_options(fn):
    options = [
        click.option("--config", "config", default="addition", show_default=True,
                     help=f"A shipped project ({', '.join(projects.names())}; see `mlflow-tunix projects`) "
                          "or a path to a config.yaml."),
        click.option("--train-data", type=str, default="", help="JSONL file that replaces the project's training data; "
                     "without --eval-data a seeded 90/10 split holds out the eval set."),
        click.option("--eval-data", type=str, default="", help="JSONL file that replaces the project's eval set."),
        click.option("--init-from", type=str, default="", metavar="DIR",
                     help="Start from this local Hugging Face checkpoint folder (Llama, Qwen2, Qwen3): its "
                          "architecture, weights and tokenizer replace the project's model and tokenizer."),
        click.option("--steps", type=WHOLE, default=0, help="Training steps (0: the project's own)."),
        click.option("--seed", type=WHOLE, default=None, help="Training seed: initial weights and batch order."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override any config value, e.g. --set train.learning_rate=0.001 (repeatable)."),
        click.option("--registered-model-name", default="", help="Registry name (default: tunix-<project>)."),
        click.option("--no-progress", is_flag=True, help="No progress bars (logs only)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _overrides(items) -> dict:
    """--set KEY=VALUE options as {dotted key: YAML value}."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        values[key.strip()] = _yaml_value(value)
    return values


def _load(config, train_data, eval_data, init_from, steps, seed, overrides, registered_model_name):
    from pathlib import Path

    from mlflow_tunix.config import load_project

    values = _overrides(overrides)
    if _opt(init_from):
        # A folder given on the command line is relative to where the command runs; a hub id stays as given.
        values["model.init_from"] = str(Path(init_from).absolute()) if Path(init_from).is_dir() else init_from
    if steps:
        values["train.steps"] = steps
    if seed is not None:
        values["train.seed"] = seed
    if _opt(registered_model_name):
        values["registered_model_name"] = registered_model_name
    return load_project(config, values, train_data=_opt(train_data), eval_data=_opt(eval_data))


def _yaml_value(text):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _resume_option(fn):
    return click.option(
        "--resume", "resume", default="", metavar="RUN_ID",
        help="Continue this run (killed, FAILED, or cut off from its tracking server) from its newest "
             "checkpoint, with its own config: no other option is needed, and none may differ.")(fn)


# What each project option holds when not given (MLproject passes these, as "" or 0).
_NOT_GIVEN = {"config": ("addition", ""), "train_data": ("",), "eval_data": ("",), "init_from": ("",), "steps": (0,),
              "seed": (None, 0), "overrides": ((),), "registered_model_name": ("",)}


def _check_resume_alone(resume, **options):
    """--resume takes the run's own config: refuse an option that would seem to change it."""
    for name, value in options.items():
        if value not in _NOT_GIVEN[name]:
            flag = "--set" if name == "overrides" else "--" + name.replace("_", "-")
            raise click.UsageError(f"--resume {resume} continues the run with its own config; drop {flag} "
                                   f"(a different config would not be the same run)")


def _train_command(fn_name, resume, no_progress, options):
    """Run the pipeline; Ctrl-C/SIGTERM (checkpointed by the trainer) exit 128+signal, no traceback.
    With train.processes > 1, start that many copies of this command as one data-parallel group."""
    from mlflow_tunix import distributed

    if not distributed.initialize_from_env():  # (a member of a group joins it before any JAX computation)
        n = _processes(resume, options)
        if n > 1:
            return _launch_group(n)
    from mlflow_tunix import pipeline

    try:
        if _opt(resume):
            _check_resume_alone(resume, **options)
            getattr(pipeline, fn_name)(None, progress=not no_progress, resume=resume)
        else:
            getattr(pipeline, fn_name)(_load(**options), progress=not no_progress)
    except KeyboardInterrupt as exc:  # in training: checkpointed at a step boundary (train.TrainingInterrupted)
        run_id = getattr(exc, "run_id", None)
        where = f"{exc or 'interrupted'}" + (f". Continue with: {_resume_command(run_id)}" if run_id else "")
        click.echo(f"[mlflow-tunix] {where}", err=True)
        sys.exit(128 + getattr(exc, "signum", 2))


def _processes(resume, options) -> int:
    from mlflow_tunix import distributed

    if _opt(resume):
        from mlflow_tunix import resume as resume_mod

        _check_resume_alone(resume, **options)
        cfg = resume_mod.find(resume).cfg
    else:
        cfg = _load(**options)
    n = distributed.processes_for(cfg.train.processes)
    if n > 1 and cfg.train.batch_size % n:  # (said here once, not by each process)
        raise TunixError(f"train.batch_size: {cfg.train.batch_size} does not split over {n} data-parallel "
                         f"processes (train.processes={cfg.train.processes}); use a multiple of {n}")
    return n


def _launch_group(n: int) -> None:
    """This command again as ``n`` processes (distributed.launch): process 0 does the job and owns
    the MLflow run, the others train beside it. If one dies, the others are stopped and the run is
    FAILED, with one line naming the process."""
    import os
    import tempfile

    from mlflow_tunix import distributed

    click.echo(f"[mlflow-tunix] data parallel: {n} processes", err=True)
    with tempfile.TemporaryDirectory() as folder:
        run_id_file = os.path.join(folder, "run_id")
        argv = [sys.executable, "-m", "mlflow_tunix.cli", *sys.argv[1:]]

        def current_run():  # the run process 0 started (distributed.announce_run), if it got that far
            return open(run_id_file).read().strip() if os.path.exists(run_id_file) else None

        try:
            distributed.launch(argv, n, env={distributed.ENV_RUN_ID_FILE: run_id_file})
        except KeyboardInterrupt as exc:  # Ctrl-C / SIGTERM: the group is stopped; the newest checkpoint stays
            signum = exc.args[0] if exc.args else 2
            run_id = current_run()
            _end_run(run_id, "KILLED")
            where = f". Continue from its newest checkpoint with: {_resume_command(run_id)}" if run_id else ""
            click.echo(f"[mlflow-tunix] stopped the {n} data-parallel processes{where}", err=True)
            sys.exit(128 + signum)
        except distributed.WorkerDied as exc:
            run_id = current_run()
            if exc.process == 0 and exc.code > 0:
                sys.exit(exc.code)  # process 0 said why itself, and ended its run
            _end_run(run_id, "FAILED")
            raise TunixError(f"{exc}; the group was stopped" + (f" and run {run_id} is FAILED; continue with: "
                                                                 f"{_resume_command(run_id)}" if run_id else "")) from None


def _end_run(run_id: str | None, status: str) -> None:
    """End the run process 0 could not end itself (it was stopped with the group)."""
    if not run_id:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status)


@main.command()
@_project_options
@_resume_option
@_one_line_errors
def run(config, train_data, eval_data, init_from, steps, seed, overrides, registered_model_name, no_progress, resume):
    """The whole job: data -> train -> evaluate -> log the model -> register it.

    Logs params, the loss curve, both datasets, eval metrics, every generated answer (as a table)
    and the model (mlflow_tunix flavor) to one MLflow run, then registers the model in Staging.
    Training is checkpointed (train.checkpoint_every); `--resume RUN_ID` continues a run that
    stopped, to the same weights an uninterrupted run would have. `--set train.processes=auto`
    trains data parallel, one process per CPU core (docs/scaling.md).
    """
    _train_command("run_main", resume, no_progress, dict(
        config=config, train_data=train_data, eval_data=eval_data, init_from=init_from, steps=steps, seed=seed,
        overrides=overrides,
        registered_model_name=registered_model_name))


@main.command()
@_project_options
@_resume_option
@_one_line_errors
def train(config, train_data, eval_data, init_from, steps, seed, overrides, registered_model_name, no_progress, resume):
    """Train a project and log the trained model (no generation eval, no registration).

    `--resume RUN_ID` continues a run that stopped, from its newest checkpoint.
    """
    _train_command("run_train", resume, no_progress, dict(
        config=config, train_data=train_data, eval_data=eval_data, init_from=init_from, steps=steps, seed=seed,
        overrides=overrides,
        registered_model_name=registered_model_name))


@main.command("resend-metrics")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--run-id", required=True, help="The run the points belong to.")
@_one_line_errors
def resend_metrics(file, run_id):
    """Log the metric points kept in FILE (a JSONL file written while the tracking server was
    away) to run --run-id.

    Points the run already has (same metric, same step) are skipped, so running it twice is
    harmless. `--resume` does this by itself before it continues a run.
    """
    from mlflow.exceptions import MlflowException

    from mlflow_tunix.tracking import resend_metrics as resend

    try:
        sent, there = resend(file, run_id)
    except MlflowException as exc:  # no such run, or the server still away
        raise TunixError(f"{file}: not sent to run {run_id}: {' '.join(str(exc).split())[:500]}") from None
    click.echo(f"sent {sent} metric points to run {run_id} ({there} were there already)")


@main.command()
@click.option("--model-uri", required=True, help="A logged model: runs:/<run>/<name>, models:/m-..., "
              "models:/<name>/<version> or models:/<name>@<alias>.")
@click.option("--eval-data", type=str, default="", help="Eval JSONL (default: the model's own project's eval set).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@_one_line_errors
def evaluate(model_uri, eval_data, no_progress):
    """Generate answers with a logged model for a held-out set and log the scores in a new run."""
    from mlflow_tunix.pipeline import run_evaluate

    run_evaluate(model_uri, eval_data=_opt(eval_data), progress=not no_progress)


@main.command()
@click.argument("model_uri")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Folder to write (must not exist, or be empty).")
@_one_line_errors
def export(model_uri, out):
    """Write the logged model MODEL_URI as a Hugging Face checkpoint folder --out.

    MODEL_URI is any URI `mlflow_tunix.load_model` takes (models:/NAME/VERSION, models:/NAME@champion,
    runs:/RUN/NAME, a local path). The folder holds config.json (LlamaForCausalLM, Qwen2ForCausalLM or
    Qwen3ForCausalLM), model.safetensors with Hugging Face tensor names, the tokenizer and
    generation_config.json: transformers, vLLM and llama.cpp's converter read it.
    """
    from mlflow_tunix import flavor, hf

    path = hf.export_hf(flavor.load_model(model_uri), out)
    click.echo(f"wrote {path}")


@main.command("projects")
def list_projects():
    """List the projects that ship with mlflow-tunix, with what each one trains.

    Run one with `mlflow-tunix run --config NAME` (or `mlflow run . -P config=NAME`); copy its
    config.yaml to start your own (`--config path/to/config.yaml`).
    """
    names = projects.names()
    width = max(map(len, names))
    for name in names:
        click.echo(f"{name:<{width}}  {projects.description(name)}")
    click.echo(f"\n(config files in {projects.directory()})")


# --------------------------------------------------------------------------- data
@main.group()
def data():
    """Make and check reasoning-trace datasets (JSONL)."""


@data.command("generate")
@click.argument("name")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="JSONL file to write.")
@click.option("--n", "n", type=click.IntRange(min=1), default=None, help="Number of examples (generator default if omitted).")
@click.option("--seed", type=int, default=None, help="Random seed: same seed, same file (default: the generator's own; "
              "42 for golden-v2, which gives tunix-rt's set).")
@click.option("--no-trace", is_flag=True, help="Direct answers: empty <reasoning> (addition only).")
@click.option("--digits", type=(int, int), default=None, help="Operand length range LO HI (addition only), e.g. --digits 1 4.")
@click.option("--family", "families", multiple=True, help="Only this family (reasoning only; repeatable), e.g. "
              "--family percent --family unit_cost. Default: all, equally.")
@_one_line_errors
def data_generate(name, out, n, seed, no_trace, digits, families):
    """Write a seeded synthetic dataset NAME to --out.

    NAME is one of: addition (n-digit sums with a digit-by-digit carry scratchpad), golden-v2
    (tunix-rt's 100-item golden set), high-card (a card duel where the answer needs the reasoning),
    reasoning (the families of tunix-rt's dev-reasoning-v2: word problems, arithmetic, string tasks,
    each with a digit-by-digit or letter-by-letter scratchpad).
    """
    from mlflow_tunix import data as data_mod
    from mlflow_tunix import generators

    options = {}
    if no_trace:
        options["trace"] = False
    if digits:
        options["digits"] = tuple(digits)
    if families:
        options["families"] = list(families)
    records = generators.generate(name, n=n, seed=seed, **options)
    data_mod.write_jsonl(records, out)
    click.echo(f"wrote {len(records)} examples to {out}")


@data.command("validate")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@_one_line_errors
def data_validate(file, as_json):
    """Check FILE (trace, prompt/completion or eval-item JSONL) and print its counts.

    Exits 2 with `file:line: problem` on the first bad record.
    """
    from mlflow_tunix import data as data_mod

    summary = data_mod.summarize(data_mod.read_jsonl(file))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{file}: ok")
    for key, value in summary.items():
        if isinstance(value, dict):
            click.echo(f"  {key}:")
            for k, v in value.items():
                click.echo(f"    {k}: {v}")
        else:
            click.echo(f"  {key}: {value}")


# --------------------------------------------------------------------------- sweeps
@main.command()
@click.option("--config", "config", default="addition", show_default=True, help="A shipped project or a config.yaml.")
@click.option("--space", "space", required=True, type=str,
              help="YAML file: dotted config key -> {choice|grid: [values]} or {uniform|loguniform|randint: [low, high]}, "
                   "e.g. `train.learning_rate: {loguniform: [0.0003, 0.01]}`.")
@click.option("--trials", type=WHOLE, default=1, show_default=True,
              help="Samples of the space (each grid point is run this many times).")
@click.option("--metric", default="answer_accuracy", show_default=True, help="The metric that picks the best trial.")
@click.option("--mode", type=click.Choice(["max", "min"]), default="max", show_default=True)
@click.option("--scheduler", type=click.Choice(["asha", "fifo"]), default="asha", show_default=True,
              help="asha stops trials whose loss lags at 1/4 and 1/2 of training; fifo runs all to the end.")
@click.option("--max-concurrent", type=WHOLE, default=0, help="Trials at once (0: one per core of the Ray cluster).")
@click.option("--ray-address", default="", help="Attach to a running Ray cluster (e.g. 127.0.0.1:6379); "
              "default: a local Ray on this machine. Trials write to MLFLOW_TRACKING_URI (use a server for a cluster).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value in every trial.")
@click.option("--register-best", is_flag=True, help="Register the best trial's model (it joins the leaderboard).")
@_one_line_errors
def sweep(config, space, trials, metric, mode, scheduler, max_concurrent, ray_address, overrides, register_best):
    """Search a project's config space with Ray Tune; every trial is a full run nested in one sweep run.

    The sweep's parent run holds the space, the scheduler, the best trial's params and metrics and a
    trials table (sweep/trials.json); each trial trains and evaluates in a child run. Trials stopped
    early by ASHA end KILLED with a tag saying so; a crashed trial is FAILED and the sweep goes on.
    Needs the [sweep] extra: pip install 'mlflow-tunix[sweep]'.
    """
    from mlflow_tunix.sweep import run_sweep

    values = _overrides(overrides)
    result = run_sweep(_opt(config) or "addition", space, trials=trials, metric=metric, mode=mode, scheduler=scheduler,
                       max_concurrent=max_concurrent or None, ray_address=_opt(ray_address),
                       register_best=register_best, overrides=values)
    best = result.best
    click.echo(f"sweep run {result.parent_run_id}: {len(result.trials)} trials; best: "
               + (f"{best['run_id']} {metric}={best[metric]:.4g}" if best else "none finished")
               + (f"; registered version {result.registered_version}" if result.registered_version else ""))


# --------------------------------------------------------------------------- comparing runs
@main.command()
@click.argument("run_ids", nargs=-1, metavar="RUN [RUN ...]")
@click.option("--parent", default="", metavar="RUN", help="Compare the runs nested under this run (a sweep's trials).")
@click.option("--limit", type=click.IntRange(min=0), default=20, show_default=True,
              help="Disagreeing items printed (the HTML page has them all).")
@click.option("--no-log", is_flag=True, help="Print only; log no HTML page.")
@_one_line_errors
def compare(run_ids, parent, limit, no_log):
    """Compare 2 or more runs item by item: params that differ, final metrics side by side, and the
    eval items where they disagree (right->wrong and wrong->right counted against the first run).

    Prints a table and logs the same as a self-contained HTML page, compare/compare-<ids>.html, to
    the --parent run (else to the newest run compared): open it in the MLflow UI's Artifacts tab.
    """
    from mlflow_tunix import compare as compare_mod

    if bool(run_ids) == bool(parent):
        raise click.UsageError("give 2 or more RUN ids, or --parent RUN")
    ids = list(run_ids) or compare_mod.children(parent)
    result = compare_mod.compare_runs(ids)
    click.echo(compare_mod.format_text(result, limit=limit))
    if not no_log:
        target, path = compare_mod.log_html(result, run_id=parent or None)
        click.echo(f"\nlogged {path} to run {target}")


# --------------------------------------------------------------------------- registry
@main.command()
@click.option("--model", "model_name", required=True, help="Registered model name.")
@click.option("--metric", default="answer_accuracy", show_default=True, help="Eval metric to rank by (higher is better).")
@click.option("--eval-digest", default=None, help="Only versions evaluated on the eval set with this digest.")
@click.option("--stage", default=None, type=click.Choice(["None", "Staging", "Production", "Archived"]), help="Only versions in this stage.")
@click.option("--top", type=click.IntRange(min=1), default=None, help="Show the best K only.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@_one_line_errors
def leaderboard(model_name, metric, eval_digest, stage, top, fmt):
    """Rank the registered versions of a model by an eval metric.

    Ties break on the older version first. `json` prints a list of objects with version, stage,
    aliases, metrics, run_id and created.
    """
    from mlflow_tunix import registry

    rows = registry.leaderboard(model_name, metric=metric, eval_digest=eval_digest, stage=stage, top=top)
    click.echo(registry.format_leaderboard(rows, fmt=fmt, metric=metric))


@main.command()
@click.option("--model", "model_name", required=True, help="Registered model name.")
@click.option("--version", default=None, help="The version to promote ('best' = --best).")
@click.option("--best", is_flag=True, help="Promote the version ranked first by --metric.")
@click.option("--metric", default="answer_accuracy", show_default=True, help="Eval metric compared with the champion.")
@click.option("--max-regression", type=float, default=0.05, show_default=True,
              help="Refuse a challenger worse than the champion by more than this relative margin (0 to 1).")
@click.option("--wait", "wait", type=click.FloatRange(min=0.0, max=1e6), default=600.0, show_default=True,
              metavar="SECONDS", help="How long to wait for another registration or promotion of this model.")
@_one_line_errors
def promote(model_name, version, best, metric, max_regression, wait):
    """Move a version to Production and the `champion` alias.

    The previous Production version is archived. A challenger evaluated on another eval set than the
    champion, or worse than it by more than --max-regression, is refused. Scores are the metrics the
    versions' runs logged; a version whose metric.<name> tag says otherwise is refused.
    """
    from mlflow_tunix import registry

    if version == "best":
        version, best = None, True
    if bool(version) == bool(best):
        raise click.UsageError("give exactly one of --version V or --best")
    result = registry.promote(model_name, version=version, best=best, metric=metric, max_regression=max_regression,
                              wait=wait)
    click.echo(result.message)


# --------------------------------------------------------------------------- process set-up
# glibc's malloc for XLA on CPU: one arena, big blocks from the heap and never trimmed, on huge pages.
MALLOC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184",
                   "glibc.malloc.hugetlb=1")


def malloc_environment(environ=os.environ) -> dict | None:
    """The environment to re-run the command in so that glibc's malloc keeps XLA's per-step buffers
    instead of handing them back to the kernel, or None when that does not apply (not glibc >= 2.35 on
    Linux, the user set glibc.malloc tunables of their own, or MLFLOW_TUNIX_MALLOC=0).

    Why: XLA on CPU mallocs a step's temporaries as one block each step (139 MB for the default
    project's step, strace), above glibc's mmap threshold, so every step mmaps it, faults it in page by
    page and munmaps it: ~36 k page faults and half the step in the kernel (default project),
    ~130 k faults for `reasoning`. The tunables keep every thread on one arena (a worker thread's own
    arena maps big blocks whatever mmap_max says), big blocks on its heap (mmap_max=0) and the heap
    untrimmed, so the block is reused: 0 faults per step; and huge pages where transparent huge pages
    are on. Measured in fresh processes side by side (benchmarks/bench_malloc.py): steps 1.29x (default
    project) and 1.24x (reasoning) faster than with glibc's defaults; `mlflow-tunix train` on the
    default project 41.4 k tokens/s against 31.2 k (docs/benchmarks.md). The cost: freed memory stays
    with the process (its size is its peak). Tunables are read only when a process starts, hence the
    re-run."""
    if sys.platform != "linux" or environ.get("MLFLOW_TUNIX_MALLOC", "1") == "0":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in tunables:
        return None
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""  # "glibc 2.36"
        version = tuple(int(x) for x in libc.split()[1].split(".")[:2]) if libc.startswith("glibc ") else ()
    except (ValueError, OSError, IndexError):
        return None
    if version < (2, 35):
        return None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            huge = "[never]" not in f.read()
    except OSError:
        huge = False
    ours = ":".join(MALLOC_TUNABLES if huge else MALLOC_TUNABLES[:1])
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{ours}" if tunables else ours}


def entry():
    """The `mlflow-tunix` program: main(), in a process whose malloc keeps XLA's buffers (see
    malloc_environment; re-run once with it via exec, same process id). Tests call main()."""
    env = malloc_environment()
    if env is not None:
        try:
            # the same program again: the console script, or `python -m mlflow_tunix.cli` (MLproject)
            program = ["-m", "mlflow_tunix.cli"] if sys.argv[0].endswith("cli.py") else sys.argv[:1]
            os.execve(sys.executable, [sys.executable, *program, *sys.argv[1:]], env)
        except OSError:
            pass  # run as we are
    main()


if __name__ == "__main__":
    entry()
